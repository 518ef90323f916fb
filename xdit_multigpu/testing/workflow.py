"""Convert a UI-format workflow (what ComfyUI saves and ``example_workflows/`` ships) to the API format
``POST /prompt`` takes, using the server's ``/object_info`` for each node's widget order.

Handles what the shipped workflows use: links, widget values in input order, and the extra
"control_after_generate" value the frontend stores after seed widgets.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UI_ONLY_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})


def _is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _has_control(name: str, spec: list[Any]) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def _widget_names(info: dict[str, Any]) -> list[tuple[str, bool]]:
    """[(input name, followed by a control value)] for every widget input, in the frontend's order."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"].get(section, {}).get(name)
            if spec is not None and _is_widget(spec):
                out.append((name, _has_control(name, spec)))
    return out


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """API-format prompt for ``workflow``; raises KeyError naming an unknown node type."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in UI_ONLY_NODES or node.get("mode", 0) == 4:  # notes; bypassed nodes
            continue
        if ntype not in object_info:
            raise KeyError(f"node type {ntype!r} (node {node['id']}) is not installed on this server")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, control in _widget_names(object_info[ntype]):
            if i >= len(values):
                break
            inputs[name] = values[i]
            i += 2 if control else 1
        for inp in node.get("inputs", []):
            link = links.get(inp.get("link"))
            if link is not None:
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt


# xDiT node -> (stock node, inputs the stock node does not have)
_DISPATCHER_INPUTS = ("gpu_devices", "parallel_strategy", "scheduling_strategy", "gpus_per_group", "group_weights",
                      "ray_address")
_STOCK = {
    "XDiTUNetLoader": ("UNETLoader", _DISPATCHER_INPUTS),
    "XDiTCheckpointLoader": ("CheckpointLoaderSimple", _DISPATCHER_INPUTS),
    "XDiTKSampler": ("KSampler", ("xdit_dispatcher",)),
    "XDiTVAELoader": ("VAELoader", ("device", "parallel_devices")),
    "XDiTCLIPLoader": ("CLIPLoader", ("device",)),
    "XDiTDualCLIPLoader": ("DualCLIPLoader", ("device",)),
}


def stock_equivalent(prompt: dict[str, Any]) -> dict[str, Any]:
    """The same API prompt with every xDiT node replaced by the stock node it extends.

    Output slots of the stock nodes come first in the xDiT nodes, so links stay valid; the dispatcher
    output, which the stock graph has no use for, is simply not consumed.
    """
    out: dict[str, Any] = {}
    for nid, node in prompt.items():
        cls, drop = _STOCK.get(node["class_type"], (node["class_type"], ()))
        out[nid] = {"class_type": cls, "inputs": {k: v for k, v in node["inputs"].items() if k not in drop}}
    return out


def object_info_of(classes: dict[str, Any]) -> dict[str, Any]:
    """The part of ComfyUI's ``/object_info`` that ``ui_to_api`` reads, built from node classes in-process
    (tests that check a workflow without starting a server)."""
    info = {}
    for name, cls in classes.items():
        types = cls.INPUT_TYPES()
        info[name] = {"input": types, "input_order": {k: list(v) for k, v in types.items()}}
    return info
