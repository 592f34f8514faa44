"""What tests/ and benchmarks/ share: live servers and their readers (neither imports the other).

    processes.py        LiveProcess: start a command, wait for its readiness URL, keep its log,
                        stop it on every path; running(), free_port(), alive_pids()
    servers.py          LiveServer (a loupe server, any flags), LiveRouter (SGLang's router),
                        run_server(); read_metrics(), wait_metrics(), sse_events()
    reference_models.py transformers' model on the bundled weights, loupe's logits step by step

Both put the repository root on sys.path. `import harness` gives the first two;
`harness.reference_models` (torch, transformers) is imported by name where needed.
"""

from harness.processes import REPO, LiveProcess, NotReady, alive_pids, free_port, running
from harness.servers import (
    BUNDLED_NAME,
    LiveRouter,
    LiveServer,
    parse_metrics,
    read_metrics,
    run_server,
    server_command,
    server_env,
    sse_events,
    wait_metrics,
)

__all__ = ["BUNDLED_NAME", "REPO", "LiveProcess", "LiveRouter", "LiveServer", "NotReady", "alive_pids", "free_port",
           "parse_metrics", "read_metrics", "run_server", "running", "server_command", "server_env", "sse_events",
           "wait_metrics"]
