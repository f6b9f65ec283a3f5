"""The Markdown report of an evaluation (`<workdir>/eval/report.md`) from its metrics dict."""

from collections.abc import Sequence
from typing import Any

# (metrics.json key, column title): lower is better for drop, deletion and the L1 terms.
METHOD_COLUMNS = (
  ('average_drop', 'AD % ↓'),
  ('average_gain', 'AG % ↑'),
  ('average_increase', 'AI % ↑'),
  ('insertion', 'Ins ↑'),
  ('deletion', 'Del ↓'),
  ('road_morf', 'ROAD MoRF ↓'),
  ('road_lerf', 'ROAD LeRF ↑'),
  ('road_combined', 'ROAD ↑'),
  ('alignment_l1', 'align L1 ↓'),
  ('alignment_ssim', 'align SSIM ↑'),
  ('image_l1', 'image L1 ↓'),
  ('image_ssim', 'image SSIM ↑'),
  ('suite_images_per_second', 'suite img/s'),
)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """The lines of a Markdown table."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def render(result: dict[str, Any], class_names: Sequence[str]) -> str:
  """The report: accuracy, per-class accuracy, the method table (a note under it for each
  of `result['warnings']`, `eval_lib.degenerate_findings`), the confusions, figures."""
  lines = [
    f'# Evaluation: {result["model"]} ({result["condition"]}) on {result["dataset"]}',
    '',
    f'Checkpoint `{result["checkpoint"]}` (step {result["step"]}): test accuracy '
    f'**{100 * result["test_accuracy"]:.2f}%** on {int(result["test_count"])} images, '
    f'test loss {result["test_loss"]:.4f}; prototype loss {result["test_proto_loss"]:.4f} '
    f'and Batch-CAM loss {result["test_bcam_loss"]:.4f} ({result["metric"]}).',
    '',
    '## Explanations',
    '',
    f'On the first {result["num_images"]} test images, maps of the '
    f'{"ground-truth" if result["target"] == "label" else "predicted"} class at layer '
    f'`{result["layer"]}`. AD/AG/AI: Average Drop/Gain/Increase (%), Ins/Del: insertion '
    f'and deletion AUC ({result["insertion_deletion"]}); align: mean normalised map of each '
    'class vs its prototype (L1, SSIM), image: the same per image'
    + (
      '; ROAD: target probability with the most (MoRF) or least (LeRF) salient 10-90% of '
      'pixels imputed, and (LeRF - MoRF) / 2.'
      if any('road_combined' in v for v in result['methods'].values())
      else '.'
    ),
    '',
  ]
  measured = set().union(*(values for values in result['methods'].values()))
  columns = [(key, title) for key, title in METHOD_COLUMNS if key in measured]
  rows = [
    [method] + [f'{values[key]:.4g}' for key, _ in columns]
    for method, values in result['methods'].items()
  ]
  lines += markdown_table(['method'] + [title for _, title in columns], rows)
  for finding in result.get('warnings', []):
    lines += ['', f'Note: {finding["message"]}']
  lines += _randomisation_section(result)
  lines += ['', '## Per-class test accuracy', '']
  lines += markdown_table(
    ['class', 'accuracy %'],
    [[name, f'{100 * result["per_class_accuracy"][name]:.2f}'] for name in class_names],
  )
  lines += ['', '## Most frequent confusions', '']
  lines += markdown_table(
    ['true', 'predicted', 'count'],
    [[e['true'], e['predicted'], str(e['count'])] for e in result['top_confusions']],
  )
  lines += [
    '',
    '## Figures',
    '',
    '![confusion](confusion.png)',
    '',
    'Data prototypes and mean Grad-CAM of correctly classified test images:',
    '',
    '![cam prototypes](cam_prototypes.png)',
    '',
    'Mean Grad-CAM (predicted class) of the most frequent confusions:',
    '',
    '![error prototypes](error_prototypes.png)',
    '',
  ]
  lines += _overlays_section(result)
  return '\n'.join(lines)


def _randomisation_section(result: dict[str, Any]) -> list[str]:
  """The parameter randomisation test's table (layers down, methods across), if measured."""
  sanity = result.get('sanity')
  if not sanity:
    return []
  methods = list(sanity['methods'])
  rows = [
    [f'`{layer.removeprefix("params/")}`'] + [f'{sanity["methods"][m][i]:.3f}' for m in methods]
    for i, layer in enumerate(sanity['layers'])
  ]
  return [
    '',
    '## Parameter randomisation test',
    '',
    f'Mean Spearman rank correlation over the first {sanity["images"]} test images between '
    "each method's maps and those of the model with its blocks re-initialised from the "
    "output down to the row's block (cascading; Adebayo et al. 2018). A method that explains "
    'the model falls far below 1; one that stays near 1 shows the image, not the model.',
    '',
    *markdown_table(['randomised down to'] + methods, rows),
  ]


def _overlays_section(result: dict[str, Any]) -> list[str]:
  """overlays.png under a caption naming its images (the first or the misclassified test
  images, by index), or why there is none."""
  shown = result.get('overlay_images', [])
  selection = result.get('overlay_selection', 'first')
  if not shown:
    return ['No overlays.png: `num_overlays` is 0, or no test image is misclassified.', '']
  indices = ', '.join(str(i) for i in shown)
  return [
    f'Saliency maps of the {selection} test images (indices {indices}); a red title marks a '
    'misclassified image:',
    '',
    '![overlays](overlays.png)',
    '',
  ]
