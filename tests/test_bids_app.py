"""The BIDS App entry point (`mixmap bids` / `mixmap-bids BIDS_DIR OUTPUT_DIR participant|group`):
a derivative dataset with each selected participant's maps and report, one model for the group,
the BIDS App flags, and bad calls refused with one line."""

from __future__ import annotations

import json

import pytest
from test_cohort import map_path, one_line_error, run, write_bids_dataset
from typer.testing import CliRunner

from mixmap.cli.bids import bids as bids_command
from mixmap.cli.bids import spaced_labels


@pytest.fixture()
def dataset(tmp_path):
    return write_bids_dataset(tmp_path / "bids")


def test_participant_level_maps_the_chosen_participants_with_reports(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "deriv"
    r = run("bids", root, out, "participant", "--participant-label", "sub-01",
            "--participant-label", "03", "--method", "lsq", "--quiet")
    assert r.exit_code == 0, r.output
    assert map_path(out, "sub-01", "D").exists() and map_path(out, "sub-03_ses-1", "K").exists()
    assert not (out / "sub-02").exists()
    assert (out / "sub-01" / "dwi" / "sub-01_model-msdki_report.html").exists()
    assert (out / "sub-03" / "ses-1" / "dwi" / "sub-03_ses-1_model-msdki_report.html").exists()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "mixmap"
    assert desc["BIDSVersion"] and desc["SourceDatasets"][0]["URL"].startswith("file://")


def test_group_level_trains_one_model_for_every_participant(dataset, tmp_path):
    root, _ = dataset
    out, work = tmp_path / "deriv", tmp_path / "work"
    r = run("bids", root, out, "group", "--method", "vae-gmm", "--epochs", "4",
            "--eb-rounds", "1", "-w", work, "--nprocs", "2", "--quiet")
    assert r.exit_code == 0, r.output
    for entities in ("sub-01", "sub-02", "sub-03_ses-1"):
        assert map_path(out, entities, "D").exists(), entities
        report = map_path(out, entities, "D").with_name(f"{entities}_model-msdki_report.html")
        assert "Learned mixture" in report.read_text(encoding="utf-8"), entities
    cohort = json.loads((out / "cohort.json").read_text())
    assert len(cohort["Subjects"]) == 3 and cohort["TrainedModel"]
    assert (out / "dataset_description.json").exists()


def test_work_dir_holds_the_training_checkpoint(dataset, tmp_path):
    from mixmap import bids_app
    from mixmap.fitting import get_fitter

    root, _ = dataset
    out, work, seen = tmp_path / "deriv", tmp_path / "work", []
    ckpt = work / ".mixmap-checkpoint-cohort-msdki-vae-gmm.pt"

    def fitter():
        f = get_fitter("vae-gmm", "msdki", epochs=3, eb_rounds=1)
        f.on_epoch = lambda row: seen.append(ckpt.exists())
        return f

    bids_app.run(fitter, root, out, "group", labels=["01", "02"], work_dir=work)
    assert seen and all(seen[1:])  # written after each epoch, in -w
    assert not ckpt.exists() and not list(out.glob(".mixmap-checkpoint*"))  # removed at the end
    assert not (out / "sub-03").exists()


def test_space_separated_labels_as_bids_apps_take_them(dataset, tmp_path):
    import typer

    root, _ = dataset
    app = typer.Typer(add_completion=False)
    app.command()(bids_command)
    out = tmp_path / "deriv"
    args = spaced_labels([str(root), str(out), "participant", "--participant-label", "01",
                          "02", "--method", "lsq", "--quiet"])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert map_path(out, "sub-01", "D").exists() and map_path(out, "sub-02", "D").exists()
    assert not (out / "sub-03").exists()


@pytest.mark.parametrize("change, says", [
    ("no-description", "dataset_description.json: not found; a BIDS dataset needs it"),
    ("label", "no DWI scan of participant(s) 09; it has 01, 02, 03"),
    ("same-folder", "the output folder is the input dataset"),
    ("level", "'everyone' is not one of"),
])
def test_bad_bids_calls_give_one_line(dataset, tmp_path, change, says):
    root, _ = dataset
    out = root if change == "same-folder" else tmp_path / "deriv"
    if change == "no-description":
        (root / "dataset_description.json").unlink()
    args = [root, out, "everyone" if change == "level" else "participant", "--method", "lsq"]
    if change == "label":
        args += ["--participant-label", "09"]
    r = run("bids", *args)
    if change == "level":  # the option parser's own message
        assert r.exit_code == 2 and says in r.output
    else:
        assert says in one_line_error(r, "bids")
    assert not (tmp_path / "deriv").exists()
