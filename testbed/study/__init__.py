"""Studies: named, versioned recipes that reproduce a published finding with the testbed's own runs.

A study is one or more sweeps (the sweep language of testbed/sweep), an analysis over the
collected points (testbed/fit), and a verdict. `testbed study run NAME --size tiny|cpu|gpu
--out DIR` trains its runs through the sweep registry (rerunning skips done runs) and writes
DIR/report.md, DIR/figures.json and plots; `testbed study report DIR` only re-analyses.
See docs/studies.md.
"""
