"""The expected status of every route for every credential: the coordinator's access reference.

`python -m tests.unit.coordinator.auth_table` prints it as the Markdown table of README.md ("Who may call
what"); test_auth.py checks the app against it, the app's routes against its rows, and README.md against
its rendering.

Each cell is one request on a fresh coordinator where workers `a` and `b` are live: routes of one worker
name `b` in their path, "worker A's secret" is `a`'s (speaking for another worker), "own secret" is
`b`'s. On routes without a worker in the path both columns mean "a worker's secret".
"""

from __future__ import annotations

CREDENTIALS: tuple[tuple[str, str], ...] = (
    ("none", "none"),
    ("wrong", "unknown token"),
    ("cluster", "cluster token"),
    ("other_worker", "worker A's secret"),
    ("own_worker", "own secret"),
    ("read", "read-only token"),
    ("admin", "admin token"),
)

# (method, path) -> statuses in CREDENTIALS order
EXPECTED: dict[tuple[str, str], tuple[int, ...]] = {
    ("POST", "/workers/register"): (401, 401, 201, 403, 403, 403, 403),
    ("POST", "/workers/{worker_id}/heartbeat"): (401, 401, 403, 403, 200, 403, 403),
    ("POST", "/workers/{worker_id}/suspect"): (401, 401, 403, 403, 200, 403, 403),
    ("DELETE", "/workers/{worker_id}"): (401, 401, 403, 403, 204, 403, 204),
    ("GET", "/workers"): (401, 401, 403, 200, 200, 200, 200),
    ("GET", "/training/ready"): (401, 401, 403, 200, 200, 403, 403),
    ("GET", "/job"): (401, 401, 200, 200, 200, 200, 200),
    ("GET", "/cluster/status"): (401, 401, 403, 403, 403, 200, 200),
    ("GET", "/cluster/diagnosis"): (401, 401, 403, 403, 403, 200, 200),
    ("GET", "/cluster/history"): (401, 401, 403, 403, 403, 200, 200),
    ("GET", "/events"): (401, 401, 403, 403, 403, 200, 200),
    ("GET", "/metrics"): (401, 401, 403, 403, 403, 200, 200),
    ("GET", "/healthz"): (200, 200, 200, 200, 200, 200, 200),
    ("GET", "/"): (200, 200, 200, 200, 200, 200, 200),
    ("GET", "/static/app.js"): (200, 200, 200, 200, 200, 200, 200),
    ("GET", "/static/style.css"): (200, 200, 200, 200, 200, 200, 200),
    ("GET", "/openapi.json"): (401, 401, 403, 403, 403, 200, 200),
    ("GET", "/docs"): (401, 401, 403, 403, 403, 200, 200),
}


def render(table: dict[tuple[str, str], tuple[int, ...]] = EXPECTED) -> str:
    """The table as Markdown, one row per route."""
    head = "| route | " + " | ".join(label for _, label in CREDENTIALS) + " |"
    rule = "| --- |" + " --- |" * len(CREDENTIALS)
    rows = [
        f"| `{method} {path}` | " + " | ".join(map(str, codes)) + " |"
        for (method, path), codes in table.items()
    ]
    return "\n".join([head, rule, *rows])


if __name__ == "__main__":
    print(render())
