"""Everything a reader looks at: PNG figures (`figures`), Markdown tables and the
evaluation report (`markdown`), a reproduction grid's results.md (`grid_tables`). Nothing
here computes a metric; inputs are numpy arrays and metric dicts."""
