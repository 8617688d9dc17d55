"""Studies: a config (``conf/study/``) of training stages, a comparison set and evaluations, run end to end.

:mod:`.plan` turns a study config into jobs (ordinary ``less-train`` / ``less-eval`` configs with their own
folders), :mod:`.execute` runs one job and judges whether a finished one can be skipped, :mod:`.slurm`
submits the graph as submitit jobs with dependencies, :mod:`.cli` is ``less-study``. This package is the
top floor of the platform: it imports the rest, nothing imports it.
"""
