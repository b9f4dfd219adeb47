"""Maps the config's addressing and ISO-TP settings onto can-isotp's Address and parameters."""

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


def isotp_address(addressing: Addressing, server: bool = False) -> isotp.Address:
    """The tester-side address (or the ECU-side one with server=True, ids and addresses swapped)."""
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
    return {
        "stmin": config.st_min,
        "blocksize": config.block_size,
        "tx_padding": config.padding,
        "tx_data_length": config.data_length,
        "tx_data_min_length": 8 if config.padding is not None and not config.fd else None,
        "can_fd": config.fd,
        "bitrate_switch": False,
        "max_frame_size": config.max_pdu,
        "rx_flowcontrol_timeout": 1000,
        "rx_consecutive_frame_timeout": 1000,
        "blocking_send": False,
    }
