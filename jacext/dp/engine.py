"""``PrivacyEngine``: Opacus's entry point, on jacext's clipping inside the backward pass."""

import math
import os
import warnings
from typing import IO, Any, BinaryIO, Dict, List, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from jacext.dp.accounting import create_accountant, noise_multiplier_for
from jacext.dp.clip import ClipGrad, PerLayerClipGrad, per_parameter_bounds
from jacext.dp.data import poisson_loader, poisson_rate
from jacext.dp.guard import check_loss_reduction, check_max_grad_norm, check_noise_multiplier
from jacext.dp.module import PrivateModule, unwrap
from jacext.dp.optimizer import DPOptimizer, urandom_generator
from jacext.errors import JacextError

ADAPTIVE_KEYS = (
    "target_unclipped_quantile",
    "clipbound_learning_rate",
    "max_clipbound",
    "min_clipbound",
    "unclipped_num_std",
)
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


class PrivacyEngine:
    """DP-SGD for a model, its optimizer and its data: a drop-in for ``opacus.PrivacyEngine``.

    ``make_private`` returns a model that clips every sample's gradient inside its own backward
    pass (jacext.dp.PrivateModule: no per-sample gradients in memory where the layers allow), an
    optimizer that refuses any gradient that clipping did not produce and adds the noise
    (jacext.dp.DPOptimizer, around any torch optimizer), and a Poisson-sampling data loader.
    Accounting is Opacus's (``accountant``: "rdp", "prv" or "gdp").

    Args:
        accountant: the accounting mechanism.
        secure_mode: noise drawn with Opacus's floating-point-attack defence, and noise and sampling
            from a generator seeded from ``os.urandom`` (``torchcsprng``'s, where installed).
            torch has no cryptographically secure generator built in: see docs/dp.md.

    Example:
        >>> from jacext.dp import PrivacyEngine        # instead of: from opacus import PrivacyEngine
        >>> engine = PrivacyEngine(accountant="rdp")   # doctest: +SKIP
        >>> model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        ...     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)   # doctest: +SKIP
        >>> for x, y in loader:                        # doctest: +SKIP
        ...     optimizer.zero_grad()
        ...     criterion(model(x), y).backward()      # clipped inside this backward pass
        ...     optimizer.step()                       # noise, scaling, accounting, the step
        >>> engine.get_epsilon(delta=1e-5)             # doctest: +SKIP
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(accountant)
        self.secure_mode = secure_mode
        self.secure_rng: Optional[torch.Generator] = None
        self.dataset: Optional[Any] = None
        self.sample_rate: Optional[float] = None
        self._loader: Optional[DataLoader] = None
        self._optimizer: Optional[DPOptimizer] = None
        if secure_mode:
            self.secure_rng = _secure_generator()
        else:
            warnings.warn(
                "Secure RNG turned off. This is perfectly fine for experimentation as it allows for much "
                "faster training performance, but remember to turn it on and retrain one last time before "
                "production with ``secure_mode`` turned on.",
                stacklevel=2,
            )

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion=None,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: Optional[torch.Generator] = None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        grad_scaler=None,
        **kwargs,
    ):
        """The private model, optimizer and data loader (and ``criterion``, unchanged, for
        ``grad_sample_mode="ghost"``, as Opacus returns it then).

        Args:
            module: the model, or ``DistributedDataParallel(model)`` (then every process must run
                this with the same arguments; the noise is drawn once, from one generator state that
                rank 0 broadcasts, and the accounting is the global batch's).
            optimizer: any torch optimizer over the model's parameters.
            criterion: the loss (only checked: its ``reduction`` must be ``loss_reduction``).
            data_loader: the training data; replaced by Poisson sampling at rate 1 / len(data_loader)
                unless ``poisson_sampling=False``.
            noise_multiplier: sigma >= 0 (noise of standard deviation sigma C).
            max_grad_norm: C > 0; for ``clipping="per_layer"`` a list, one per optimizer parameter.
            batch_first: only True (the batch in the inputs' first dimension).
            loss_reduction: ``"mean"`` or ``"sum"``, as the loss reduces over the batch.
            poisson_sampling: replace the loader by Poisson sampling (the accounting assumes it).
            clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"`` (then ``kwargs`` needs
                ``target_unclipped_quantile``, ``clipbound_learning_rate``, ``max_clipbound``,
                ``min_clipbound``, ``unclipped_num_std``, as Opacus).
            noise_generator: the noise's generator (None: torch's global one, as Opacus).
            grad_sample_mode: accepted for compatibility; jacext always clips inside the backward.
            wrap_model: only True.
            rand_on_empty: Opacus's DPDataLoader option.
            grad_scaler: the ``torch.amp.GradScaler`` that will scale the loss (jacext only): the
                clipping bounds the unscaled per-sample gradients by C, and ``scaler.step(optimizer)``
                lets the optimizer unscale the clipped sum before the noise.

        Returns:
            ``(model, optimizer, data_loader)``, or ``(model, optimizer, criterion, data_loader)``
            for ``grad_sample_mode="ghost"``.
        """
        if noise_generator is not None and self.secure_mode:
            raise ValueError("Passing seed is prohibited in secure mode")
        if not batch_first:
            raise NotImplementedError(
                "jacext.dp takes the batch from the inputs' first dimension: use batch_first=True"
            )
        if not wrap_model:
            raise NotImplementedError("jacext.dp always returns a wrapping private model: use wrap_model=True")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        if clipping not in ("flat", "per_layer", "adaptive"):
            raise ValueError(f"clipping must be 'flat', 'per_layer' or 'adaptive', got {clipping!r}")
        unknown = set(kwargs) - set(ADAPTIVE_KEYS) - {"epsilon_tolerance"}
        if unknown:
            raise TypeError(f"make_private got unexpected arguments {sorted(unknown)}")
        check_loss_reduction(loss_reduction)
        noise_multiplier = check_noise_multiplier(noise_multiplier)
        reduction = getattr(criterion, "reduction", None)
        if reduction in ("mean", "sum") and reduction != loss_reduction:
            raise ValueError(
                f"the criterion reduces with {reduction!r} but loss_reduction is {loss_reduction!r}: the per-sample "
                "gradients would be scaled wrongly"
            )
        if isinstance(module, PrivateModule):
            raise JacextError("the module is already private (returned by make_private); pass the original model")
        model_params = {id(p) for p in module.parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("Module parameters are different than optimizer Parameters")

        distributed = isinstance(module, DistributedDataParallel)
        world_size = torch.distributed.get_world_size() if distributed else 1
        if self.dataset is None:
            self.dataset = data_loader.dataset
        elif self.dataset is not data_loader.dataset:
            warnings.warn(
                "PrivacyEngine detected a new dataset: privacy accounting works per dataset; make a new "
                "PrivacyEngine for a different one",
                stacklevel=2,
            )
        if poisson_sampling:
            data_loader = poisson_loader(
                data_loader,
                distributed=distributed,
                generator=self.secure_rng,
                batch_first=batch_first,
                rand_on_empty=rand_on_empty,
            )
            sample_rate = 1 / len(data_loader)
        else:
            rate = poisson_rate(data_loader)
            sample_rate = rate if rate is not None else 1 / len(data_loader)
            if rate is None:
                warnings.warn(
                    "poisson_sampling=False with a data loader that does not sample Poisson batches: the "
                    f"accountant's guarantee (sample rate {sample_rate:.4g}) assumes Poisson sampling and is "
                    "only an approximation for these batches",
                    stacklevel=2,
                )
        expected = int(len(data_loader.dataset) * sample_rate)  # type: ignore[arg-type]

        if clipping == "per_layer":
            trainable = [p for p in unwrap(module).parameters() if p.requires_grad]
            if {id(p) for p in trainable} != {id(p) for p in params}:
                raise JacextError(
                    "per-layer clipping needs the optimizer to hold every trainable parameter of the model "
                    "(one bound each): freeze the others (requires_grad_(False))"
                )
            clip: ClipGrad = PerLayerClipGrad(per_parameter_bounds(params, max_grad_norm), loss_reduction, grad_scaler)
        else:
            if not isinstance(max_grad_norm, (int, float)):
                raise ValueError(f"{clipping} clipping needs one number as max_grad_norm, got {max_grad_norm!r}")
            clip = ClipGrad(check_max_grad_norm(max_grad_norm), loss_reduction, grad_scaler)
        adaptive = {k: kwargs[k] for k in ADAPTIVE_KEYS if k in kwargs} if clipping == "adaptive" else None

        generator = self.secure_rng if self.secure_mode else noise_generator
        if distributed:
            generator = _shared_generator(generator, next(iter(module.parameters())).device)
        private = PrivateModule(module, clip)
        try:
            dp_optimizer = DPOptimizer(
                optimizer,
                clip=clip,
                noise_multiplier=noise_multiplier,
                expected_batch_size=expected / world_size,
                loss_reduction=loss_reduction,
                generator=generator,
                secure_mode=self.secure_mode,
                world_size=world_size,
                adaptive=adaptive,
                label=f"the DPOptimizer of {type(self).__name__} {id(self):#x}",
            )
        except BaseException:
            private._close()
            raise
        dp_optimizer.sample_rate = sample_rate  # type: ignore[attr-defined]
        dp_optimizer.poisson_sampling = poisson_sampling or poisson_rate(data_loader) is not None  # type: ignore[attr-defined]
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        self.sample_rate, self._loader, self._optimizer = sample_rate, data_loader, dp_optimizer
        if grad_sample_mode == "ghost":
            return private, dp_optimizer, criterion, data_loader
        return private, dp_optimizer, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion=None,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: Union[float, List[float]],
        **kwargs,
    ):
        """``make_private`` with the noise multiplier that spends ``target_epsilon`` (at
        ``target_delta``) in ``epochs`` epochs (Opacus's ``get_noise_multiplier``; other arguments
        as ``make_private``)."""
        sample_rate = 1 / len(data_loader)
        if len(self.accountant) > 0:
            warnings.warn(
                "make_private_with_epsilon with privacy budget already spent: the noise multiplier assumes "
                "zero starting point, so the overall budget will be higher",
                stacklevel=2,
            )
        extra = {"epsilon_tolerance": kwargs.pop("epsilon_tolerance")} if "epsilon_tolerance" in kwargs else {}
        sigma = noise_multiplier_for(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            epochs=epochs,
            mechanism=self.accountant.mechanism(),
            **extra,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta``.

        Args:
            delta: the target delta.

        Returns:
            epsilon, from the accountant.
        """
        return float(self.accountant.get_epsilon(delta=delta))

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        *,
        path: Union[str, os.PathLike, BinaryIO, IO[bytes]],
        module: nn.Module,
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        checkpoint_dict: Optional[Dict[str, Any]] = None,
        module_state_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_save_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Save the model, the optimizer, the accountant's history and the DP state: sigma, C,
        the sample rate, adaptive clipping's state, and the generators' states (the noise
        generator's, the sampler's, torch's global one where they draw from it; none in secure
        mode, where the generators are seeded afresh on loading).

        Args:
            path: where to ``torch.save``.
            module: the private model.
            optimizer: the private optimizer.
            noise_scheduler: an Opacus noise scheduler, saved with it.
            grad_clip_scheduler: an Opacus clipping scheduler, saved with it.
            checkpoint_dict: more entries to save.
            module_state_dict_kwargs: for ``module.state_dict``.
            torch_save_kwargs: for ``torch.save``.
        """
        ckpt = dict(checkpoint_dict or {})
        ckpt["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        ckpt["privacy_accountant_state_dict"] = self.accountant.state_dict()
        dp: Dict[str, Any] = {"sample_rate": self.sample_rate, "secure_mode": self.secure_mode}
        if optimizer is not None:
            ckpt["optimizer_state_dict"] = optimizer.state_dict()
            dp["optimizer"] = optimizer.dp_state_dict()
            if optimizer.generator is not None and not self.secure_mode:
                dp["noise_generator_state"] = optimizer.generator.get_state()
        sampler = self._sampler_generator()
        if sampler is not None and not self.secure_mode:
            dp["sampler_generator_state"] = sampler.get_state()
        dp["global_rng_state"] = torch.get_rng_state()
        ckpt["jacext_dp"] = dp
        if noise_scheduler is not None:
            ckpt["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            ckpt["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
        torch.save(ckpt, path, **(torch_save_kwargs or {}))

    def load_checkpoint(
        self,
        *,
        path: Union[str, os.PathLike, BinaryIO, IO[bytes]],
        module: nn.Module,
        optimizer: Optional[DPOptimizer] = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        module_load_dict_kwargs: Optional[Dict[str, Any]] = None,
        torch_load_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict:
        """Resume from ``save_checkpoint``: after ``make_private`` with the same arguments, the
        training continues on the same trajectory (the same noise and batches) with the
        accountant's history. Refuses a checkpoint whose sample rate, loss reduction, clipping or
        expected batch size differ from this engine's. Restores torch's global generator where the
        noise or the sampling draw from it.

        Args:
            path: what ``save_checkpoint`` wrote.
            module: the private model.
            optimizer: the private optimizer.
            noise_scheduler: an Opacus noise scheduler to restore.
            grad_clip_scheduler: an Opacus clipping scheduler to restore.
            module_load_dict_kwargs: for ``module.load_state_dict``.
            torch_load_kwargs: for ``torch.load`` (default ``weights_only=True``).

        Returns:
            The checkpoint's other entries.
        """
        ckpt = torch.load(path, **{"weights_only": True, **(torch_load_kwargs or {})})
        dp = ckpt.pop("jacext_dp", None)
        if dp is None:
            raise JacextError("the checkpoint was not written by jacext.dp.PrivacyEngine.save_checkpoint")
        if (
            self.sample_rate is not None
            and dp["sample_rate"] is not None
            and not math.isclose(dp["sample_rate"], self.sample_rate, rel_tol=1e-12)
        ):
            raise JacextError(
                f"the checkpoint was trained at sample rate {dp['sample_rate']}, this engine's data loader samples "
                f"at {self.sample_rate}: the accounting would no longer hold; make_private with the same data "
                "loader (batch size and dataset) before loading"
            )
        module.load_state_dict(ckpt.pop("module_state_dict"), **(module_load_dict_kwargs or {}))
        self.accountant.load_state_dict(ckpt.pop("privacy_accountant_state_dict"))
        optimizer_state = ckpt.pop("optimizer_state_dict", None)
        if optimizer is not None:
            if optimizer_state is None or "optimizer" not in dp:
                raise JacextError("the checkpoint holds no optimizer state")
            optimizer.load_dp_state_dict(dp["optimizer"])
            optimizer.load_state_dict(optimizer_state)
            if "noise_generator_state" in dp and optimizer.generator is not None and not self.secure_mode:
                optimizer.generator.set_state(dp["noise_generator_state"])
        sampler = self._sampler_generator()
        if sampler is not None and "sampler_generator_state" in dp and not self.secure_mode:
            sampler.set_state(dp["sampler_generator_state"])
        global_used = (optimizer is not None and optimizer.generator is None) or sampler is None
        if global_used and not self.secure_mode:
            torch.set_rng_state(dp["global_rng_state"])
        state = ckpt.pop("noise_scheduler_state_dict", None)
        if noise_scheduler is not None and state is not None:
            noise_scheduler.load_state_dict(state)
        state = ckpt.pop("grad_clip_scheduler_state_dict", None)
        if grad_clip_scheduler is not None and state is not None:
            grad_clip_scheduler.load_state_dict(state)
        return ckpt

    def _sampler_generator(self) -> Optional[torch.Generator]:
        loader = self._loader
        if loader is None:
            return None
        sampler = loader.batch_sampler
        return getattr(sampler, "generator", None)


def _secure_generator() -> torch.Generator:
    """torchcsprng's generator where installed, else a torch generator seeded from os.urandom."""
    try:
        import torchcsprng  # type: ignore[import-not-found]

        return torchcsprng.create_random_device_generator("/dev/urandom")
    except ImportError:
        warnings.warn(
            "secure_mode without torchcsprng: torch has no cryptographically secure generator, so the noise and "
            "the sampling come from torch's generator seeded from os.urandom (an unpredictable seed, not a "
            "secure stream); see docs/dp.md",
            stacklevel=3,
        )
        return urandom_generator()


def _shared_generator(generator: Optional[torch.Generator], device) -> torch.Generator:
    """One noise generator state on every process: rank 0's (a fresh os.urandom-seeded one if
    none was given), broadcast. Every process then draws the same noise, which DDP's averaged,
    identical gradients need: different noise would make the replicas drift apart."""
    import torch.distributed as dist

    if generator is None:
        generator = urandom_generator(device)
    state = generator.get_state()
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    shared = state.to(backend_device)
    dist.broadcast(shared, src=0)
    generator.set_state(shared.cpu())
    return generator
