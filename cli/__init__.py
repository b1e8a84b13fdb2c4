"""The `dicom-node` command line: the one place that imports both the node (dicom_node) and
the training side (training), so neither package imports the other's commands.

Each subcommand imports what it needs inside its body, so `dicom-node status` never pays
for importing torch. Errors of our own hierarchies become one line and exit status 2.
"""
from __future__ import annotations

import sys

import click


class _OneLineErrors(click.Group):
    """Turns our error types into one line and a non-zero exit instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from dicom_node.errors import NodeError
        from model.checkpoint import CheckpointError
        from training.errors import TrainingError

        try:
            return super().invoke(ctx)
        except (NodeError, TrainingError, CheckpointError, FileNotFoundError, PermissionError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="dicom-node")
def main() -> None:
    """Enhance radiographs with interpretable per-pixel LUT maps, as a DICOM node or offline."""


from dicom_node.enhance_command import enhance  # noqa: E402

main.add_command(enhance)


from dicom_node.node_commands import discard, echo, forward, retry, serve, status  # noqa: E402

main.add_command(serve)
main.add_command(status)
main.add_command(echo)
main.add_command(retry)
main.add_command(forward)
main.add_command(discard)


from dicom_node.explain import explain  # noqa: E402

main.add_command(explain)

from training.commands import evaluate_command, synth_command, train_command  # noqa: E402

main.add_command(synth_command)
main.add_command(train_command)
main.add_command(evaluate_command)
