"""The simulation benchmark: bazaar's policy and the baselines replayed against workload traces.

A tool beside the control loop, not part of it: it imports the pure policy
(:mod:`autoscaler.policy`) and nothing imports it but the ``bazaar simulate`` command.

- :mod:`.traces` draws a trace's arrivals once per (trace, seed); :mod:`.simulator` replays them
  through one gateway queue and its replicas, deterministically, driven by one policy;
- :mod:`.baselines` are HPA, KEDA, Knative and Ray Serve as their defaults behave, plus two
  references (static peak, oracle);
- :mod:`.benchmark` runs every trace against every policy, :mod:`.report` turns the runs into the
  table, the JSON and the plots, and :mod:`.command` is the ``bazaar simulate`` subcommand.

The command's module imports only the standard library, and this package's ``__init__`` nothing,
so that ``bazaar --help`` lists ``simulate`` without loading numpy or matplotlib. The model, the
traces and the metrics are described in docs/autoscaling.md ("The simulation benchmark").
"""
