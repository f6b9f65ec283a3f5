"""Everything a reader looks at: PNG figures (`figures`), the evaluation report's Markdown
(`eval_report`) and the writing of all an evaluation's outputs (`eval_outputs`), a
reproduction grid's results.md (`grid_tables`). Nothing here computes a metric; inputs are
numpy arrays and metric dicts."""
