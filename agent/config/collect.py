"""`collect:` of the agent's config: local collection plans (kept as written) and collection bounds.

The plans themselves are validated by `agent.wire.plan` (as strictly as a plan from MQTT): by
`check-config`, and by the agent when it applies them. Here only their place is checked.
"""

from __future__ import annotations

from typing import Any

from agent.config import model as m
from agent.config.reader import Node, describe, integer, join, number, text


def parse_collect(node: Node | None, ecus: tuple[m.EcuConfig, ...]) -> m.CollectConfig:
    if node is None:
        return m.CollectConfig()
    plans = tuple(dict(raw) for path, raw in node.items_of("plans") if _mapping(node, path, raw))
    sleep = node.child("sleep")
    max_plans = node.get("max_plans", integer(1, 256), 16)
    if max_plans is not None and len(plans) > max_plans:
        node.problems.add(join(node.path, "plans"), f"{len(plans)} local plans: at most collect.max_plans "
                                                    f"({max_plans}) are applied at once")
    config = m.CollectConfig(
        plans=plans,
        max_plans=max_plans,
        max_scheduled_requests=node.get("max_scheduled_requests", integer(1, 65_536), 1024),
        max_dids_per_request=node.get("max_dids_per_request", integer(1, 64), 8),
        telemetry_max_bytes=node.get("telemetry_max_bytes", integer(16 * 1024, 1024**3), 4 * 1024 * 1024),
        backoff_s=node.get("backoff_s", number(0.1, 3600), 1.0),
        backoff_max_s=node.get("backoff_max_s", number(1, 86_400), 300.0),
        sleep=_sleep(sleep, ecus) if sleep else m.SleepConfig(),
    )
    node.finish()
    return config


def _mapping(node: Node, path: str, raw: Any) -> bool:
    if not isinstance(raw, dict):
        node.problems.add(path, f"expected a plan (a mapping), got {describe(raw)}")
        return False
    return True


def _sleep(node: Node, ecus: tuple[m.EcuConfig, ...]) -> m.SleepConfig:
    silence = node.get("silence_ms", integer(0, 86_400_000), 0)
    cond = node.child("condition")
    condition = None
    if cond is not None:
        component = cond.get("component", text(max_len=64))
        data = cond.get("data", text(max_len=64))
        below = cond.get("below", number())
        recheck = cond.get("recheck_ms", integer(0, 86_400_000), 600_000)
        ecu = next((e for e in ecus if e.name == component), None)
        if component is not None and ecu is None:
            cond.problems.add(join(cond.path, "component"), f"no component named {component!r}")
        elif ecu is not None and data is not None:
            spec = ecu.did_by_name(data)
            if spec is None:
                cond.problems.add(join(cond.path, "data"), f"{component} has no DID named {data!r}")
            elif spec.codec not in ("unsigned", "signed"):
                cond.problems.add(join(cond.path, "data"), f"{data} is not numeric (codec {spec.codec})")
        cond.finish()
        if component is not None and data is not None and below is not None:
            condition = m.SleepCondition(component, data, below, recheck)
    node.finish()
    return m.SleepConfig(silence, condition)


