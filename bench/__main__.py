"""``python -m bench``: run every benchmark, one after the other (each is also runnable on its own).

Sequential on purpose: each one measures its baseline and DUO in the same run on a 2-core machine,
so two benchmarks at once would skew both. Defaults keep each to a few minutes at most.
"""

from bench import iti38, kos, rad75, sim_pacs, timeline, transfer

codes = []
for name, run in (("sim_pacs", sim_pacs.main), ("iti38", lambda: iti38.main([])),
                  ("rad75", lambda: rad75.main([])), ("timeline", lambda: timeline.main([])),
                  ("transfer", lambda: transfer.main([])), ("kos", lambda: kos.main([]))):
    print(f"== bench.{name} ==", flush=True)
    codes.append(run())
    print(flush=True)

raise SystemExit(max(codes))
