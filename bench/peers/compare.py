"""Peer comparison: prefprune's influence scores against other influence libraries, same work.

    .venv-peers/bin/python bench/peers/compare.py \
        ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --out bench/out/peers.json

Runs in the separate environment ``.venv-peers`` (see ``bench/peers/requirements.txt``); the
peers are benchmark-only, never runtime dependencies of prefprune.

The work, identical for every method:

* data: the HH pairs, ``load_preferences`` + ``split_preferences(seed=0)``; the first
  ``--n-train`` training pairs and the first ``--n-val`` validation pairs; ``--max-length``
  tokens per row (prompt cut from the left, as prefprune encodes).
* model: ONE reward model: ``bench/out/hh_model`` when it exists (trained by
  ``bench/train_hh.py``), else the default MiniLM backbone ``RewardModel.create(seed=0)``
  trained one epoch on the subset. θ = LoRA + head weight (``model.trainable_parameters()``);
  every peer sees exactly these as its only parameters with ``requires_grad``.
* loss per pair: ``softplus(-(r_chosen - r_rejected))`` (written as BCE-with-logits of the
  margin against the label 1). Training objective: the mean over training pairs.
* target: the mean validation loss. Each method's score of pair i is turned into prefprune's
  harm convention (larger = more harmful). Every peer here returns
  ``s_i = g_valᵀ (H+λI)⁻¹ g_i`` (or ``g_valᵀ g_i`` without curvature) with no minus sign;
  removing pair i changes the validation loss by ``Δ_i = s_i / n``, so ``harm_i = -s_i``
  (a positive factor 1/n does not change a rank). Peers that score per validation pair are
  averaged over the validation pairs (the score is linear in g_val, so this is exact).
* damping λ: the absolute value prefprune's run chose (0.1 × trace(G)/min(n, P)), read from
  its metadata and passed to every peer as an absolute damping.
* reference: prefprune ``compute_scores(solver="direct")``: the exact damped Gauss–Newton solve.

Every method is timed in this process; times are reported as ratios to prefprune's CG-IF run.
Run torch on one thread (``torch.set_num_threads(1)``), since the machine is shared.
Spearman ρ of every method's harm against the reference harm is reported; a method that fails
is recorded with its exact error.

Two forms of the same model are handed to peers (both checked against prefprune's margins):
``rows`` runs a pair's two responses as two rows of one BERT batch (what autograd-per-sample
peers need), ``packed`` runs them as one sequence of 2L tokens with a block-diagonal attention
mask and restarted positions, so that peers that take per-sample gradients from module hooks
(Kronfluence, EK-FAC) see one sample per *pair*, not per response.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, Dataset


def _use_frozen_prefprune() -> None:
    """``PREFPRUNE_SRC=DIR``: import prefprune from DIR (e.g. ``git archive HEAD prefprune |
    tar -x -C DIR``) instead of the editable install, so a run measures one commit while the
    working tree is being edited."""
    src = os.environ.get("PREFPRUNE_SRC")
    if src:
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
        sys.path.insert(0, src)


_use_frozen_prefprune()

from prefprune import (  # noqa: E402
    InfluenceConfig,
    RewardModel,
    RewardModelConfig,
    TrainConfig,
    compute_scores,
    load_preferences,
    split_preferences,
    train_reward_model,
)

# --------------------------------------------------------------------------------------------
# data and model adapters


class PairDataset(Dataset):
    """One item per pair: ``x`` (3, 2, L_i) = input ids / attention mask / token types of the
    chosen and rejected rows, and ``y`` = 1.0 (the chosen response is preferred)."""

    def __init__(self, model: RewardModel, records: Any) -> None:
        self.items = []
        for p, c, r in zip(records["prompt"], records["chosen"], records["rejected"]):
            enc = model.encode_pairs([p], [c], [r]).inputs
            types = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
            self.items.append(torch.stack([enc["input_ids"], enc["attention_mask"], types]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i], torch.tensor(1.0)


def pad_stack(xs: list[torch.Tensor]) -> torch.Tensor:
    width = max(x.shape[-1] for x in xs)
    return torch.stack([F.pad(x, (0, width - x.shape[-1])) for x in xs])


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row of the batch (as prefprune does)."""
    return pad_stack([x for x, _ in batch]), torch.stack([y for _, y in batch])


def query_item(dataset: PairDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All validation pairs as ONE sample: x (1, 3, 2K, L) with the K chosen rows first, then
    the K rejected ones; y (1, K). Its per-sample loss is the mean validation loss, so a peer
    that solves once per test sample solves once, for g_val, as prefprune does."""
    x = pad_stack([x for x, _ in (dataset[i] for i in range(len(dataset)))])  # (K, 3, 2, L)
    chosen, rejected = x[:, :, 0], x[:, :, 1]  # (K, 3, L)
    rows = torch.cat([chosen, rejected]).permute(1, 0, 2)  # (3, 2K, L)
    return rows[None], torch.ones(1, x.shape[0])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


class PairMargin(nn.Module):
    """The reward model as a module ``x -> margin``: x (B, 3, 2K, L) → (B, K), or (B,) when
    K = 1. Only θ requires grad. ``packed=True`` runs each pair as one 2L-token sequence
    (K = 1 only), see the module docstring."""

    def __init__(self, model: RewardModel, packed: bool = False) -> None:
        super().__init__()
        self.net = model.model
        self.packed = packed
        base = self.net.get_base_model()
        self.encoder = base.bert
        self.classifier = base.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()
        if self.packed:
            return self._packed(x)
        batch, _, rows, length = x.shape
        ids, mask, types = (x[:, k].reshape(batch * rows, length) for k in range(3))
        dtype = next(self.classifier.parameters()).dtype
        out = self.net(input_ids=ids, token_type_ids=types,
                       attention_mask=additive_mask(mask, dtype)[:, None, None, :])
        rewards = out.logits.reshape(batch, rows).float()
        half = rows // 2
        margins = rewards[:, :half] - rewards[:, half:]
        return margins[:, 0] if half == 1 else margins

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, _, length = x.shape
        ids, mask, types = (x[:, k].reshape(batch, 2 * length) for k in range(3))
        positions = torch.arange(length).repeat(2)[None].expand(batch, -1)
        half = torch.arange(2 * length) // length
        same = half[:, None] == half[None, :]  # block diagonal: a row sees its own half only
        allowed = same[None] & mask.bool()[:, None, :]
        dtype = next(self.classifier.parameters()).dtype
        full = additive_mask(allowed, dtype)[:, None]
        hidden = self.encoder(input_ids=ids, token_type_ids=types, position_ids=positions,
                              attention_mask=full).last_hidden_state
        cls = hidden[:, [0, length]]  # (B, 2, d): [CLS] of chosen and of rejected
        pooled = self.encoder.pooler.activation(self.encoder.pooler.dense(cls))
        rewards = self.classifier(pooled).squeeze(-1).float()  # (B, 2)
        return rewards[:, 0] - rewards[:, 1]


class TwoClass(nn.Module):
    """Logits (0, m) for cross-entropy peers: CE with class 1 = softplus(−m), the BT loss."""

    def __init__(self, inner: PairMargin) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margins = self.inner(x)
        return torch.stack([torch.zeros_like(margins), margins], dim=-1)


def bt_loss(margins: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BT loss: BCE-with-logits of the margin against 1 = softplus(-m)."""
    return F.binary_cross_entropy_with_logits(margins, target.to(margins.dtype))


def theta_modules(module: nn.Module) -> list[str]:
    """Names of the nn.Linear modules that hold θ (LoRA A/B, the head)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)
            and any(p.requires_grad for p in m.parameters(recurse=False))]


def theta_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# peers: each returns (per-training-pair score s_i, without sign change; info dict)


@dataclasses.dataclass
class Work:
    model: RewardModel
    train: PairDataset
    val: PairDataset
    damping: float
    batch_size: int
    max_iter: int
    workdir: Path
    dattri_mode: str = "rev-rev"


def fresh(work: Work) -> RewardModel:
    """A private copy: some peers rewrite the model in place (Kronfluence wraps modules and
    clears requires_grad), which must not leak into the next peer."""
    clone = copy.copy(work.model)
    clone.model = copy.deepcopy(work.model.model)
    return clone


def train_head_bias(module: nn.Module) -> None:
    """Make the head bias trainable, for peers that refuse a layer whose parameters are partly
    frozen. Its margin gradient is exactly zero (it adds the same constant to both rewards), so
    it adds a zero coordinate to every g_i and to g_val: exact scores are unchanged."""
    for name, param in module.named_parameters():
        if name.endswith("modules_to_save.default.bias"):
            param.requires_grad_(True)


def loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def run_kronfluence(work: Work, strategy: str) -> tuple[np.ndarray, dict]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    module = PairMargin(fresh(work), packed=True)
    tracked = theta_modules(module)

    class BradleyTerryTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            margins = model(x)
            if sample:  # the true Fisher: labels drawn from the model (= GGN in expectation)
                with torch.no_grad():
                    y = torch.bernoulli(torch.sigmoid(margins))
            return F.binary_cross_entropy_with_logits(margins, y.float(), reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.binary_cross_entropy_with_logits(model(x), y.float(), reduction="sum")

        def get_influence_tracked_modules(self):
            return tracked

    task = BradleyTerryTask()
    model = prepare_model(module, task)
    out = work.workdir / f"kronfluence-{strategy}"
    shutil.rmtree(out, ignore_errors=True)
    analyzer = Analyzer(analysis_name="hh", model=model, task=task, cpu=True,
                        disable_tqdm=True, disable_model_save=True, output_dir=str(out))
    kwargs = DataLoaderKwargs(collate_fn=collate)
    analyzer.set_dataloader_kwargs(kwargs)
    analyzer.fit_all_factors(factors_name=strategy, dataset=work.train,
                             per_device_batch_size=work.batch_size,
                             factor_args=FactorArguments(strategy=strategy),
                             overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(scores_name="s", factors_name=strategy,
                                     query_dataset=work.val, train_dataset=work.train,
                                     per_device_query_batch_size=len(work.val),
                                     per_device_train_batch_size=work.batch_size,
                                     score_args=ScoreArguments(damping_factor=work.damping),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("s")["all_modules"]  # (n_val, n_train)
    return scores.double().mean(dim=0).numpy(), {"tracked_modules": len(tracked)}


def run_pydvl(work: Work, method: str) -> tuple[np.ndarray, dict]:
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, EkfacInfluence
    from pydvl.influence.torch.util import SecondOrderMode

    info: dict[str, Any] = {}
    if method == "ekfac":
        module = TwoClass(PairMargin(fresh(work), packed=True))
        train_head_bias(module)
        model = EkfacInfluence(module, hessian_regularization=work.damping, progress=False)
    else:
        module = PairMargin(fresh(work))
        mode = SecondOrderMode.GAUSS_NEWTON if method == "cg_gn" else SecondOrderMode.HESSIAN
        model = CgInfluence(module, bt_loss, regularization=work.damping, rtol=1e-5,
                            maxiter=work.max_iter, second_order_mode=mode,
                            warn_on_max_iteration=False)
        info["maxiter"] = work.max_iter
    label = (lambda y: y.long()) if method == "ekfac" else (lambda y: y)
    train = DataLoader(work.train, batch_size=work.batch_size, shuffle=False,
                       collate_fn=lambda b: (collate(b)[0], label(collate(b)[1])))
    model = model.fit(train)
    if method == "ekfac":  # EK-FAC scores per validation pair (cheap); averaged
        x_q, y_q = collate([work.val[i] for i in range(len(work.val))])
    else:  # one solve, for the mean validation loss
        x_q, y_q = query_item(work.val)
    factors = model.influence_factors(x_q, label(y_q))
    parts = [model.influences_from_factors(factors, x, y, mode=InfluenceMode.Up)
             for x, y in train]
    return torch.cat(parts, dim=1).detach().double().mean(dim=0).numpy(), info


def run_captum_tracin(work: Work) -> tuple[np.ndarray, dict]:
    from captum.influence import TracInCP

    module = PairMargin(fresh(work))
    train_head_bias(module)
    path = work.workdir / "captum-theta.pt"
    torch.save({n: p.detach().clone() for n, p in module.named_parameters()
                if p.requires_grad}, path)

    def load(model: nn.Module, ckpt: str) -> float:
        model.load_state_dict(torch.load(ckpt), strict=False)
        return 1.0  # learning rate: TracInCP then is the plain gradient dot product

    tracin = TracInCP(module, loader(work.train, work.batch_size), checkpoints=[str(path)],
                      checkpoints_load_func=load,
                      loss_fn=nn.BCEWithLogitsLoss(reduction="none"),
                      batch_size=work.batch_size, sample_wise_grads_per_batch=False,
                      layers=theta_modules(module))
    x_q, y_q = collate([work.val[i] for i in range(len(work.val))])
    scores = tracin.influence((x_q, y_q), show_progress=False)  # (n_val, n_train)
    return scores.detach().double().mean(dim=0).numpy(), {}


def run_dattri(work: Work, method: str) -> tuple[np.ndarray, dict]:
    from dattri.algorithm.influence_function import (
        IFAttributorCG,
        IFAttributorDataInf,
        IFAttributorLiSSA,
    )
    from dattri.task import AttributionTask

    module = PairMargin(fresh(work))
    names = theta_names(module)

    def loss_func(params, data):
        x, y = data
        return bt_loss(torch.func.functional_call(module, params, (x,)), y)

    task = AttributionTask(loss_func=loss_func, model=module, checkpoints=module.state_dict())
    info: dict[str, Any] = {}
    full = loader(work.train, work.batch_size)
    if method == "cg":
        # dattri sums one CG solve per batch of the full-train loader; one batch holding every
        # training pair makes it the solve of the full damped Hessian.
        full = loader(work.train, len(work.train))
        attributor = IFAttributorCG(task, layer_name=names, max_iter=work.max_iter, tol=1e-7,
                                    regularization=work.damping, mode=work.dattri_mode)
        info.update(max_iter=work.max_iter, mode=work.dattri_mode)
    elif method == "datainf":
        attributor = IFAttributorDataInf(task, layer_name=names, regularization=work.damping)
    else:
        attributor = IFAttributorLiSSA(task, layer_name=names, damping=work.damping,
                                       recursion_depth=work.max_iter, batch_size=1)
        info["recursion_depth"] = work.max_iter
    attributor.cache(full)
    x_q, y_q = query_item(work.val)
    test = DataLoader(list(zip(x_q, y_q)), batch_size=1)
    scores = attributor.attribute(loader(work.train, work.batch_size), test)  # (n_train, 1)
    return scores.detach().double()[:, 0].numpy(), info


PEERS: dict[str, tuple[str, str, str, Callable[[Work], tuple[np.ndarray, dict]]]] = {
    # name: (package, method, curvature, runner)
    "kronfluence_ekfac": ("kronfluence", "EK-FAC", "true Fisher (labels sampled from the "
                          "model; = GGN in expectation), EK-FAC block-diagonal per layer",
                          lambda w: run_kronfluence(w, "ekfac")),
    "kronfluence_kfac": ("kronfluence", "K-FAC", "true Fisher, K-FAC block-diagonal",
                         lambda w: run_kronfluence(w, "kfac")),
    "pydvl_cg_gn": ("pyDVL", "CG (SecondOrderMode.GAUSS_NEWTON)", "pyDVL's 'Gauss–Newton': "
                    "mean ∇ℓ∇ℓᵀ = empirical Fisher (weights σ(−m)², not σ(m)σ(−m))",
                    lambda w: run_pydvl(w, "cg_gn")),
    "pydvl_cg_hessian": ("pyDVL", "CG (SecondOrderMode.HESSIAN)", "exact Hessian (double "
                         "backward), full training set per product",
                         lambda w: run_pydvl(w, "cg_hessian")),
    "pydvl_ekfac": ("pyDVL", "EK-FAC", "EK-FAC of the Fisher", lambda w: run_pydvl(w, "ekfac")),
    "captum_tracincp": ("captum", "TracInCP (1 checkpoint, lr 1)", "none (g_valᵀg_i)",
                        run_captum_tracin),
    "dattri_cg": ("dattri", "IFAttributorCG", "exact Hessian (rev-rev HVP)",
                  lambda w: run_dattri(w, "cg")),
    "dattri_datainf": ("dattri", "IFAttributorDataInf", "empirical Fisher per layer, DataInf "
                       "closed-form swap approximation", lambda w: run_dattri(w, "datainf")),
    "dattri_lissa": ("dattri", "IFAttributorLiSSA", "exact Hessian, stochastic (batch 1)",
                     lambda w: run_dattri(w, "lissa")),
}


# --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def load_model(args: argparse.Namespace, train: Any) -> tuple[RewardModel, str]:
    if args.model and Path(args.model).is_dir():
        model = RewardModel.load(args.model)
        source = f"{args.model} (bench/train_hh.py)"
    else:
        model = RewardModel.create(RewardModelConfig(max_length=args.max_length), seed=0)
        train_reward_model(model, train, TrainConfig(epochs=1), progress=False)
        source = "RewardModel.create(seed=0) + 1 epoch on the subset"
    model.config = dataclasses.replace(model.config, max_length=args.max_length)
    return model, source


def check_adapters(model: RewardModel, train: PairDataset, records: Any) -> dict[str, float]:
    """Max |margin difference| of both module forms against prefprune's own margins."""
    n = min(8, len(train))
    x, _ = collate([train[i] for i in range(n)])
    batch = model.encode_pairs(records["prompt"][:n], records["chosen"][:n],
                               records["rejected"][:n])
    with torch.no_grad():
        ref = model.margins(batch)
        return {"rows": float((PairMargin(model)(x) - ref).abs().max()),
                "packed": float((PairMargin(model, packed=True)(x) - ref).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", default="bench/out/hh_model")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-iter", type=int, default=20,
                        help="iteration cap for the peers' iterative exact-Hessian solvers")
    parser.add_argument("--dattri-cg-mode", default="rev-rev", choices=("rev-rev", "rev-fwd"),
                        help="dattri's HVP autodiff mode for IFAttributorCG")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/out/peers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    loaded = load_preferences(args.data)
    splits = split_preferences(loaded.dataset, seed=0)
    train = splits["train"].select(range(min(args.n_train, len(splits["train"]))))
    val = splits["validation"].select(range(min(args.n_val, len(splits["validation"]))))
    model, source = load_model(args, train)
    train_ds, val_ds = PairDataset(model, train), PairDataset(model, val)

    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
        "model": source, "n_train": len(train), "n_val": len(val),
        "n_parameters": model.num_trainable, "adapter_max_abs_margin_error":
        check_adapters(model, train_ds, train)}

    base = dict(scores=("if",), score_batch_size=args.batch_size)
    reference, t_ref = timed(lambda: compute_scores(
        model, train, val, InfluenceConfig(solver="direct", **base), progress=False))
    cg, t_cg = timed(lambda: compute_scores(model, train, val, InfluenceConfig(**base),
                                            progress=False))
    damping = float(reference.metadata["damping"])
    ref = reference.table["if"].to_numpy()
    solve = cg.metadata["solves"]["validation"]
    rows = [
        {"name": "prefprune_direct", "package": "prefprune", "version": version("prefprune"),
         "method": "direct (dual Woodbury solve)", "curvature": "exact Gauss–Newton",
         "seconds": t_ref, "spearman": 1.0, "status": "ok", "notes": "the reference",
         "stages": reference.metadata["timings_seconds"]},
        {"name": "prefprune_cg", "package": "prefprune", "version": version("prefprune"),
         "method": "CG", "curvature": "exact Gauss–Newton", "seconds": t_cg,
         "spearman": spearman(cg.table["if"].to_numpy(), ref), "status": "ok",
         "notes": f"{solve['iterations']} iterations, residual {solve['final_residual']:.2g}",
         "stages": cg.metadata["timings_seconds"]},
    ]
    figures["damping"] = damping
    workdir = args.out.parent / "peers.work"
    workdir.mkdir(parents=True, exist_ok=True)
    work = Work(model, train_ds, val_ds, damping, args.batch_size, args.max_iter, workdir,
                args.dattri_cg_mode)
    for name in [p for p in args.peers.split(",") if p]:
        package, method, curvature, runner = PEERS[name]
        row: dict[str, Any] = {"name": name, "package": package, "method": method,
                               "curvature": curvature}
        try:
            row["version"] = version(package)
        except Exception as exc:
            row.update(status="not installed", error=repr(exc))
            rows.append(row)
            continue
        print(f"--- {name}", flush=True)
        sink = io.StringIO()
        try:
            with contextlib.redirect_stderr(sink):
                (scores, info), seconds = timed(lambda r=runner: r(work))
            harm = -np.asarray(scores, dtype=np.float64)  # s_i = n Δ_i → harm = −s_i
            row.update(status="ok", seconds=seconds, spearman=spearman(harm, ref),
                       spearman_unaligned=spearman(-harm, ref), info=info,
                       harm_head=harm[:5].tolist())
        except Exception as exc:
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                       traceback=traceback.format_exc()[-3000:])
        row["stderr_tail"] = sink.getvalue()[-800:]
        rows.append(row)
        save(args.out, figures, rows, t_cg)  # after every peer: a crash keeps what ran
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=str),
              flush=True)
    save(args.out, figures, rows, t_cg)
    print(json.dumps(figures, indent=2, default=str))


def save(path: Path, figures: dict[str, Any], rows: list[dict[str, Any]], t_cg: float) -> None:
    for row in rows:
        if row.get("seconds") is not None:
            row["ratio_to_prefprune_cg"] = row["seconds"] / t_cg
    figures["results"] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
