"""`make bench`: the numbers users ask for, measured side by side (issue 8).

Each piece (``python -m bench --only PIECE``) measures one or two of the six measures, merges
its numbers into ``bench/results.json`` and regenerates the plots and ``bench/RESULTS.md`` from
everything measured so far. Targets are reported, never asserted.
"""
