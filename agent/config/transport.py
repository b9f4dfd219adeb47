"""The can-isotp Address and Params an ECU entry stands for: built when the config is checked, used at start-up.

Building them here, in config, means whatever can-isotp would refuse at start-up is a config error with
its path (`check-config`, exit 78) instead of a traceback when the agent opens the bus.
"""

from __future__ import annotations

from typing import Any

import isotp

from agent.config.model import Addressing, IsoTpConfig

_MODES = {
    "normal_11bit": isotp.AddressingMode.Normal_11bits,
    "normal_29bit": isotp.AddressingMode.Normal_29bits,
    "normal_fixed_29bit": isotp.AddressingMode.NormalFixed_29bits,
    "extended_11bit": isotp.AddressingMode.Extended_11bits,
    "extended_29bit": isotp.AddressingMode.Extended_29bits,
    "mixed_11bit": isotp.AddressingMode.Mixed_11bits,
    "mixed_29bit": isotp.AddressingMode.Mixed_29bits,
}
# N_Bs / N_Cr of the userspace stack (ms): the longest pause between flow control / consecutive frames.
FLOW_CONTROL_TIMEOUT_MS = 1000
CONSECUTIVE_FRAME_TIMEOUT_MS = 1000


def isotp_address(addressing: Addressing, server: bool = False) -> isotp.Address:
    """The tester-side address (or the ECU-side one with server=True, ids and addresses swapped).

    Raises ValueError (from can-isotp) when the combination is not a valid ISO-TP address.
    """
    txid, rxid = addressing.request_id, addressing.response_id
    target, source = addressing.target_address, addressing.source_address
    if server:
        txid, rxid = rxid, txid
        target, source = source, target
    kwargs: dict[str, Any] = {"addressing_mode": _MODES[addressing.mode], "txid": txid, "rxid": rxid}
    if addressing.mode.startswith(("extended", "normal_fixed")):
        kwargs.update(target_address=target, source_address=source)
    if addressing.mode.startswith("mixed"):
        kwargs["address_extension"] = addressing.address_extension
        if addressing.mode == "mixed_29bit":
            kwargs.update(target_address=target, source_address=source)
    return isotp.Address(**kwargs)


def rx_ids(address: isotp.Address) -> list[tuple[int, bool]]:
    """The (arbitration id, extended) pairs this address receives on."""
    extended = address.is_rx_29bits()
    ids = {address.get_rx_arbitration_id(isotp.TargetAddressType.Physical)}
    return [(i, extended) for i in sorted(ids)]


def isotp_params(config: IsoTpConfig) -> dict[str, Any]:
    """can-isotp's TransportLayerLogic parameters for one ECU."""
    return {
        "stmin": config.st_min,
        "blocksize": config.block_size,
        "tx_padding": config.padding,
        "tx_data_length": config.data_length,
        "tx_data_min_length": 8 if config.padding is not None and not config.fd else None,
        "can_fd": config.fd,
        "bitrate_switch": config.bitrate_switch,
        "max_frame_size": config.max_pdu,
        "wftmax": config.wftmax,
        "rx_flowcontrol_timeout": FLOW_CONTROL_TIMEOUT_MS,
        "rx_consecutive_frame_timeout": CONSECUTIVE_FRAME_TIMEOUT_MS,
        "blocking_send": False,
    }


def validated_params(config: IsoTpConfig) -> isotp.TransportLayerLogic.Params:
    """can-isotp's own Params object, validated by can-isotp; raises ValueError with its reason."""
    params = isotp.TransportLayerLogic.Params()
    for key, value in isotp_params(config).items():
        params.set(key, value, validate=False)
    params.validate()
    return params
