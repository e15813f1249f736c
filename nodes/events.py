"""Server -> frontend events of a sampling run, for the live steps x blocks map on the canvas.

`RunEvents` is a Turbo4DRun listener: the run calls it after every model call with
(stats, latest timeline entry) and once more at the end with (stats, None). It sends

- "turbo4d.step": {"node", "prompt_id", "call", "step", "percent", "stream", "row", "blocks",
  "total_steps", "summary", "elapsed"} after each model call (row = one letter per block, see
  turbo_core.run_report.STATE_CODES);
- "turbo4d.done": {"node", "prompt_id", "payload": turbo_core.run_report.run_payload(stats)} at the end.

"node" is the id of the node that runs the sampling (ComfyUI's execution context gives it, so the
stock KSampler is covered too), which is the id of that node in the browser's graph.
The sampler puts a listener in `transformer_options[LISTENERS_KEY]`; the OUTER_SAMPLE wrapper hands
those to the run. A failing send never breaks sampling: it is logged once and dropped.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from turbo_core.run_report import row_code, run_payload

log = logging.getLogger("turbo4d")

LISTENERS_KEY = "turbo4d_listeners"
EVENT_STEP = "turbo4d.step"
EVENT_DONE = "turbo4d.done"
UI_KEY = "turbo4d"  # the sampler's ui output carries the same payload, so /history has it too


def _server():
    try:
        from server import PromptServer
    except Exception:  # not inside a ComfyUI server (a script, a unit test)
        return None
    return getattr(PromptServer, "instance", None)


def _executing():
    try:
        from comfy_execution.utils import get_executing_context
    except Exception:
        return None
    return get_executing_context()


class RunEvents:
    """Sends a run's progress to the browser that queued the prompt."""

    def __init__(self, node_id: Optional[str] = None, total_steps: Optional[int] = None):
        ctx = _executing()
        self.node_id = str(node_id if node_id is not None else (ctx.node_id if ctx is not None else ""))
        self.prompt_id = ctx.prompt_id if ctx is not None else None
        self.total_steps = total_steps
        self._failed = False

    def send(self, event: str, data: dict) -> None:
        if self._failed:
            return
        server = _server()
        if server is None:
            return
        try:
            server.send_sync(event, data, getattr(server, "client_id", None))
        except Exception:
            self._failed = True
            log.exception("Turbo4D: could not send %s to the browser; the live map stops for this run", event)

    def __call__(self, stats, entry: Optional[dict]) -> None:
        if not self.node_id:
            return
        try:
            if entry is None:
                self.send(EVENT_DONE, {"node": self.node_id, "prompt_id": self.prompt_id,
                                       "payload": run_payload(stats)})
                return
            summary = stats.summary()
            summary["seconds"] = round(time.perf_counter() - stats.started, 3)
            self.send(EVENT_STEP, {
                "node": self.node_id, "prompt_id": self.prompt_id, "call": len(stats.timeline) - 1,
                "step": entry["step"], "percent": round(float(entry.get("percent", 0.0)), 4),
                "stream": entry.get("stream"), "row": row_code(entry, stats.blocks),
                "blocks": stats.blocks, "total_steps": self.total_steps, "summary": summary})
        except Exception:
            if not self._failed:
                log.exception("Turbo4D: could not build the %s event", "done" if entry is None else "step")
            self._failed = True


def ui_output(stats) -> dict:
    """The entry a sampler adds to its ui output (kept in /history and given to the node's onExecuted)."""
    return {UI_KEY: [run_payload(stats)]} if stats is not None else {}
