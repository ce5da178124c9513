"""Cluster simulator: the live scheduler policy on simulated nodes, to plan beyond one machine.

`python -m ops sim <scenario.yaml>` runs a scenario (scenarios/); `python -m ops sim
calibrate` refits the CPU device and checks the one-machine benchmark.

Reading path:
  1. config.py       — Scenario (pydantic): model, device, cluster, trace, policies, online
  2. presets.py      — model and GPU presets, with the arithmetic behind each number
  3. perf.py         — PerfModel: prefill step from FLOPs, decode step from bytes
  4. calibration.py  — the CPU device fitted to this machine's measurements (calibration.yaml)
  5. traces.py       — agentic traces: token ids for the app, lengths for the simulator
  6. events.py       — event loop, NIC links, processor-shared CPU hosts
  7. storage.py      — SimSNIC (the live StorageNIC's dispatch rule), block keys, index,
                       block write states
  8. engines.py      — simulated PE and DE: queues, steps, LoadReports
  9. cluster.py      — SimCluster: one turn's way, planned by deployments.scheduler.policy
 10. runner.py       — offline JCT, online max rate, conservation checks
 11. metrics.py, report.py, validate.py, cli.py — summaries, output, calibration check, CLI
"""
