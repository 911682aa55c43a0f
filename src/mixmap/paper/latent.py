"""Part 3, clusters and latent space (paper Fig. 3): the ``vae-gmm`` cluster maps of the scan,
and posterior samples of z (:meth:`~mixmap.fitting.learned.vae.VAEFitter.encode`) of the
simulation and of the scan in 2-D, coloured by cluster, the learned prior overlaid."""

from __future__ import annotations

import numpy as np

from mixmap.paper.run import Run, placeholder, pyplot
from mixmap.paper.scan import ORIENTATION, Scan, slice_image

#: Display coordinates of the latent figure per model (None: principal components) and
#: their axis labels (None: the projection's own).
LATENT_AXES = {"msdki": ("D", "K"), "ball-stick": None}
LATENT_LABELS = {"msdki": ("D (µm²/ms)", "K"), "ball-stick": None}
#: Posterior draws per voxel shown in the latent figure.
LATENT_DRAWS = 4

_SUPTITLE = (f"vae-gmm latent space: {LATENT_DRAWS} posterior samples of z per voxel "
             f"(refined q, importance-weighted), in the prior's coordinates; crosses and "
             f"black ellipses (1σ dashed, 2σ dotted): the learned prior's components y")
_LEAD = (f"Latent space of vae-gmm (paper Fig. 3), from `VAEFitter.encode`: "
         f"{LATENT_DRAWS} posterior samples of z per voxel, drawn from the same "
         f"importance-weighted posterior (after the per-voxel refinement of q) whose mean "
         f"the maps show. In the default configuration z is the model's unbounded parameter "
         f"vector and the learned mixture prior is Gaussian in the bounded parameters, so "
         f"the samples are drawn in those coordinates, where the prior's components are "
         f"exact ellipses: MSDKI on its D (µm²/ms) and K axes (S0 not shown; the ellipses "
         f"are the components' marginals), ball-stick on the first two principal "
         f"components of its standardised scalar coordinates (S0 in working units, f, "
         f"Dpar, Diso; the stick direction left out). Panels: the simulation coloured by "
         f"the true cluster and by vae-gmm's most likely component, then the real scan "
         f"coloured by vae-gmm's component.")


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1: the same partition, about 0: chance)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(
        np.array([float(len(ia))]))
    expected = rows * cols / total if total else 0.0
    top = 0.5 * (rows + cols) - expected
    return float((both - expected) / top) if top else 1.0


def _cluster_maps(run: Run, scan: Scan, fits: dict) -> None:
    """repro_real_clusters.png: argmax q(y|x) of vae-gmm per model on the shown slice."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 3.4), layout="constrained")
    for ax, model in zip(axes, ("ball-stick", "msdki"), strict=True):
        probs = fits[model]["vae-gmm"].cluster_probs
        ax.set_xticks([])
        ax.set_yticks([])
        if probs is None:
            ax.set_title(f"{model}: no cluster probabilities")
            continue
        k = probs.shape[1]
        ax.imshow(slice_image(scan, probs.argmax(1).astype(np.float32)), origin="lower",
                  cmap="tab10", vmin=-0.5, vmax=9.5, interpolation="nearest")
        used = np.unique(probs.argmax(1)).size
        ax.set_title(f"{model}: vae-gmm argmax q(y|x)\n{used} of {k} components used",
                     fontsize=9)
    fig.suptitle(f"most probable mixture component ({ORIENTATION})", fontsize=9)
    run.figure("repro_real_clusters.png", fig)


def latent_note(what: str, lat, truth: np.ndarray | None) -> str:
    """One line per panel group: how many components are used, their weights and means
    (and the adjusted Rand index with ``truth`` labels when given)."""
    k = lat.cluster_probs.argmax(1)
    used = np.bincount(k, minlength=lat.prior_means.shape[0])
    comps = []
    for j in np.argsort(-lat.prior_weights):
        mean = ", ".join(f"{a} {m:.2f}" for a, m in zip(lat.axes, lat.prior_means[j],
                                                         strict=True)
                         if not a.endswith(("_x", "_y", "_z")) and a != "S0")
        comps.append(f"component {j}: p(y) {lat.prior_weights[j]:.2f}, {used[j]} voxels, "
                     f"mean {mean}")
    line = f"{what}: " + "; ".join(comps)
    if truth is not None:
        line += f"; adjusted Rand index with the true clusters {adjusted_rand(truth, k):.2f}"
    return line + "."


def _panels(run: Run, scan: Scan, fitters: dict) -> tuple[list, list[str]]:
    """The latent figure's panels (title, view, labels, names) and their notes."""
    from mixmap.plots import latent_projection

    panels = []
    notes = []
    if run.latent_sim is not None:
        fitter, sim, snr = run.latent_sim
        lat = fitter.encode(sim.signals, sim.acquisition, n_samples=LATENT_DRAWS)
        view = latent_projection(lat, LATENT_AXES["msdki"], LATENT_LABELS["msdki"])
        names = [c.name for c in sim.preset.clusters]
        panels.append((f"simulation (msdki, SNR {snr:g}): true cluster", view, sim.labels,
                       names))
        panels.append((f"simulation (msdki, SNR {snr:g}): vae-gmm cluster", view,
                       lat.cluster_probs.argmax(1), None))
        notes.append(latent_note(f"simulation SNR {snr:g}", lat, sim.labels))
    else:
        notes.append("simulation panels left out (vae-gmm was not run on the simulation)")
    for model in ("msdki", "ball-stick"):
        lat = fitters[model]["vae-gmm"].encode(scan.signals, scan.acq,
                                                n_samples=LATENT_DRAWS)
        view = latent_projection(lat, LATENT_AXES[model], LATENT_LABELS[model])
        panels.append((f"{run.s.dataset} ({model}): vae-gmm cluster", view,
                       lat.cluster_probs.argmax(1), None))
        notes.append(latent_note(f"{run.s.dataset} {model}", lat, None))
    return panels, notes


def _latent(run: Run, scan: Scan, fitters: dict) -> str:
    """repro_latent.png: the simulation (true and vae-gmm clusters) and the real scan
    (vae-gmm clusters). Returns the section text."""
    from mixmap.plots import latent_panel

    plt = pyplot()
    panels, notes = _panels(run, scan, fitters)
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(4.2 * len(panels), 4.0))
    for ax, (title, view, labels, names) in zip(axes[0], panels, strict=True):
        latent_panel(ax, view, labels, names, title=title)
    fig.suptitle(_SUPTITLE, fontsize=9)
    fig.tight_layout()
    run.figure("repro_latent.png", fig)
    return _LEAD + "\n\n" + "\n".join(f"- {n}" for n in notes)


def reproduce_clusters_and_latent(run: Run, scan: Scan, fits: dict, fitters: dict) -> str:
    """Write repro_real_clusters.png and repro_latent.png (placeholders where vae-gmm did not
    run) from ``fits`` / ``fitters`` (model -> method -> FitResult / fitter on ``scan``).
    Returns the text of section repro-latent (without the figure link)."""
    if "vae-gmm" not in run.methods:
        note = "vae-gmm not run: no cluster map and no latent space"
        placeholder(run, "repro_real_clusters.png", note)
        placeholder(run, "repro_latent.png", note)
        return note
    _cluster_maps(run, scan, fits)
    return _latent(run, scan, fitters)


__all__ = ["LATENT_AXES", "LATENT_DRAWS", "LATENT_LABELS", "adjusted_rand", "latent_note",
           "reproduce_clusters_and_latent"]
