"""mkdocs hook: the command-line reference page (reference/cli.md), generated from the
commands themselves at every build, so it cannot drift from the code."""

from __future__ import annotations

import typer
from mkdocs.structure.files import File


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _command(cmd, path: str) -> list[str]:
    out = [f"## `{path}`", "", "```text", (cmd.help or "").strip(), "```", ""]
    rows = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            name = f"`{p.name.upper()}`"
            what = "argument" + (", required" if p.required else "")
        else:
            name = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
            default = p.default if p.default not in (None, (), []) else ""
            what = f"default `{default}`" if default != "" and not p.is_flag else (
                "flag" if p.is_flag else "")
        rows.append(f"| {name} | {_cell(getattr(p, 'help', '') or '')} | {_cell(what)} |")
    if rows:
        out += ["| argument / option | meaning | |", "|---|---|---|", *rows, ""]
    return out


def cli_markdown() -> str:
    from mixmap.cli import app

    group = typer.main.get_command(app)
    lines = ["# Command-line reference", "",
             "Generated from the commands (`mixmap COMMAND --help` prints the same).", ""]

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click classes)
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")
        else:
            lines.extend(_command(cmd, path))

    walk(group, "mixmap")
    return "\n".join(lines) + "\n"


def on_files(files, config):
    files.append(File.generated(config, "reference/cli.md", content=cli_markdown()))
    return files
