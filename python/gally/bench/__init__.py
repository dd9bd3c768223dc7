"""`gally bench`: gally's speed, and its peers' in the same run (see bench/README.md).

    from gally.bench import Options, run, report
    res = run(Options(model="path/to/folder", dtypes=["bf16"], threads=[2], reps=3))
    print(report.markdown(res))
"""

from . import report
from .run import Options, Results, run

__all__ = ["Options", "Results", "run", "report"]
