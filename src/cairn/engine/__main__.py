"""``python -m cairn.engine WORKSPACE``: the detached local agent (started on demand)."""

from __future__ import annotations

import argparse
import os
import sys

from cairn.engine.agent_socket import AgentSocket, signal_ready
from cairn.storage.layout import WorkspaceLayout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cairn.engine")
    parser.add_argument("workspace")
    parser.add_argument("--idle-timeout", type=float,
                        default=float(os.environ.get("CAIRN_AGENT_IDLE_TIMEOUT", "300")),
                        help="seconds without work before the agent exits (0: never; "
                             "default: $CAIRN_AGENT_IDLE_TIMEOUT or 300)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    args = parser.parse_args(argv)
    idle = None if args.idle_timeout == 0 else args.idle_timeout
    layout = WorkspaceLayout(args.workspace)
    front = AgentSocket(layout)
    if not front.acquire():
        signal_ready(b"other\n")
        return 0
    front.open()
    signal_ready(b"ready\n")  # pokes queue up while the heavy modules load

    from cairn.backend.relay import ScriptService
    from cairn.backend.through_agent import serve_scripts
    from cairn.engine.agent import Agent

    # the agent process's entry point composes the layers: the engine takes the backend's services
    return Agent(layout, idle, args.max_concurrency, front=front, script_service=ScriptService,
                 serve_scripts=serve_scripts).serve()


if __name__ == "__main__":
    sys.exit(main())
