"""`zerowire run`'s cluster driven to its end: the progress line while it trains, the fault drill
(`--kill-worker-at-step`), and what the run leaves behind (summary.json, training.png). The cluster is a
local one (`zerowire.localcluster`) or a coordinator for workers started elsewhere
(`zerowire.external_workers`): either says whether the run goes on and what its workers exited with."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any
from urllib.parse import quote


def page_url(base_url: str, read_token: str) -> str:
    """The coordinator's live page with the read token in the URL fragment (``#token=...``), which the page
    reads, keeps for the tab and removes from the address bar."""
    return f"{base_url.rstrip('/')}/#token={quote(read_token, safe='')}"


def drive(cluster: Any, job: Any, args: argparse.Namespace) -> int:
    """Start ``cluster``'s coordinator and workers, follow the job to its end (progress line, fault drill),
    write summary.json and training.png; 0 when the job completed and its model was saved."""
    from worker.coordinator_client import CoordinatorError, RetryPolicy, SyncCoordinatorClient
    from zerowire.drill import Drill, all_events
    from zerowire.localcluster import tail
    from zerowire.progress import Progress
    from zerowire.summary import build_summary, read_telemetry, write_plot

    started = time.monotonic()
    progress = Progress(job.steps)
    progress.message(
        f"zerowire run: {args.workers} workers, job {job.job_id} ({job.model} on {job.dataset}, "
        f"{job.steps} steps), output {cluster.output}{', over TLS' if cluster.tls_dir else ''}"
    )
    cluster.start_coordinator()
    if args.external_workers:  # its log may be a scheduler's, read by others: no token in it
        progress.message(
            f"zerowire run: coordinator at {cluster.url}, waiting for {args.workers} workers started "
            "elsewhere (zerowire status reads it with this run's ZEROWIRE_READ_TOKEN)"
        )
    else:
        # the status hint works as printed: it carries the run's read-only token (as a notebook server
        # prints its token URL); the token reads status and nothing else
        progress.message(
            f"zerowire run: coordinator at {cluster.url} (ZEROWIRE_READ_TOKEN={cluster.read_token} "
            f"zerowire status --coordinator {cluster.url}"
            + (f" --tls-ca {cluster.tls_dir / 'ca.pem'})" if cluster.tls_dir else ")")
        )
        # the live page, with the read token in the fragment: the browser never sends it in a request line
        progress.message(f"zerowire run: live page at {page_url(cluster.url, cluster.read_token)}")
    client = SyncCoordinatorClient(
        cluster.url,
        cluster.read_token,  # status and progress: the read-only token
        timeout_s=5.0,
        retry=RetryPolicy(attempts=2),
        verify=cluster.client_verify(),
    )
    served = client.get("/job")
    if served.get("job_hash") != job.hash:
        raise RuntimeError(f"the coordinator serves job hash {served.get('job_hash')}, expected {job.hash}")
    cluster.start_workers()
    drill = None
    if args.kill_worker_at_step is not None:
        drill = Drill(
            cluster,
            count=args.kill_workers,
            restart_after_s=args.restart_killed_after,
            at_step=args.kill_worker_at_step,
        )
    status: dict[str, Any] = {}
    deadline = None if args.timeout is None else started + args.timeout
    interrupted = False
    try:
        while cluster.running(status):
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the run did not finish within {args.timeout:.0f}s")
            if not cluster.coordinator.alive():
                raise RuntimeError(f"the coordinator died:\n{tail(cluster.coordinator.log_path)}")
            fresh = None
            try:
                status = fresh = client.cluster_status()
            except CoordinatorError as exc:
                progress.message(f"zerowire run: status unavailable: {exc}")
            else:
                latest = read_telemetry(cluster.telemetry_dir).latest_eval()
                progress.show(status, latest["test_accuracy"] if latest else None)
            for line in drill.poll(fresh) if drill is not None else []:
                progress.message(f"zerowire run: {line}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        if not args.external_workers:
            raise
        interrupted = True  # the workers are the launcher's: say what was done, whatever ended the wait
    if args.external_workers:  # a launcher's second signal must not cut the summary short
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    progress.done()
    if interrupted:
        progress.message("zerowire run: stopped by a signal; writing the summary of what was done")
    try:
        final_status = client.cluster_status()
        events = all_events(client)
    except CoordinatorError:
        final_status, events = status, []
    client.close()
    tel = read_telemetry(cluster.telemetry_dir)
    plot = cluster.output / "training.png"
    wrote_plot = write_plot(tel, plot, f"{job.model} on {job.dataset}, {args.workers} workers")
    exit_codes = cluster.exit_codes(final_status)
    summary = build_summary(
        job=job.model_dump(mode="json"),
        job_hash=job.hash,
        tel=tel,
        events=events,
        wall_time_s=time.monotonic() - started,
        worker_exit_codes=exit_codes,
        model_path=cluster.model_path if cluster.model_path.exists() else None,
        plot_path=plot if wrote_plot else None,
    )
    summary["cluster_state"] = final_status.get("state")
    # what a replay needs besides the job and the schedule (`zerowire run --replay`)
    summary.update(workers=args.workers, hosts=cluster.hosts, threads=cluster.threads, device=args.device)
    if drill is not None:
        summary["fault_drill"] = (
            drill.report(tel, events)[0]
            if drill.kills
            else {
                "killed": [],
                "note": f"no worker was killed: the run never stood at step "
                f"{args.kill_worker_at_step} or later with every worker training",
            }
        )
    (cluster.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ok = summary["completed"] and summary["model"] is not None
    acc, loss = summary["test_accuracy"], summary["final_loss"]
    print(
        f"{'finished' if ok else 'stopped' if interrupted else 'FAILED'}: "
        f"{summary['steps_done']}/{job.steps} steps, "
        f"final loss {'-' if loss is None else f'{loss:.4f}'}, "
        f"test accuracy {'-' if acc is None else f'{100 * acc:.2f}%'}, "
        f"wall time {summary['wall_time_s']:.1f}s, {summary['step_samples_per_s']} samples/s; "
        f"results in {cluster.output}"
    )
    if not ok:
        for child in cluster.worker_children():
            if child.proc.returncode:
                print(
                    f"--- {child.name} exited {child.proc.returncode}:\n{tail(child.log_path)}",
                    file=sys.stderr,
                )
    return 0 if ok else 130 if interrupted else 1
