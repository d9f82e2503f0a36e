"""Weights & Biases logging that never hangs: online or offline is decided before `wandb.init`.

    --config configs/<run>.yaml --config configs/logger/wandb.yaml

- `offline: null` (the default): online when an API key is found (WANDB_API_KEY, or ~/.netrc for the W&B
  host), else offline with one warning line. `offline: false` or WANDB_MODE=online with no key fails at once.
- With a key but no network, `wandb.init` gives up after `init_timeout` seconds (15, not wandb's 90) with a
  one-line error.
- Checkpoints go up as artifacts (`log_model`) only online; an offline run keeps them in its folder.
- Everything of a run lives in <save_dir>/<project>/<run id>/: samples/, checkpoints/, config.yaml and
  wandb/offline-run-*/ (upload later with `wandb sync <that folder>`).
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from gangen.errors import ConfigError

DEFAULT_HOST = "https://api.wandb.ai"


def wandb_host() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST


def has_api_key(host: str | None = None) -> bool:
    """Whether wandb would find credentials: WANDB_API_KEY, an identity token file, or a ~/.netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = os.environ.get("NETRC") or str(Path.home() / (".netrc" if os.name != "nt" else "_netrc"))
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(host or wandb_host()).netloc)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_mode(offline: bool | None) -> Literal["online", "offline", "disabled"]:
    """online / offline / disabled from the `offline` option, WANDB_MODE and the credentials found.

    Raises ConfigError when online was asked for explicitly (offline=False or WANDB_MODE=online) and no
    API key exists: wandb would otherwise prompt or fail inside training.
    """
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "disabled"
    if offline or (offline is None and env in ("offline", "dryrun")):
        return "offline"
    if has_api_key():
        return "online"
    if offline is False or env in ("online", "run"):
        asked = "offline: false" if offline is False else f"WANDB_MODE={env}"
        raise ConfigError(
            f"W&B online was asked for ({asked}) but no API key was found for {wandb_host()}: run `wandb login` "
            "(or set WANDB_API_KEY), or log offline with --trainer.logger.init_args.offline true"
        )
    return "offline"


def check_settings(project: Any, init_timeout: Any = 15.0) -> None:
    """ConfigError for a project name W&B refuses (it is also a folder under save_dir) or a timeout <= 0."""
    if not isinstance(project, str) or not 0 < len(project) <= 128 or set(project) & set("/\\#?%:"):
        raise ConfigError(
            f"W&B project {project!r}: W&B takes 1-128 characters without / \\ # ? % :, "
            "choose another --trainer.logger.init_args.project"
        )
    if not isinstance(init_timeout, (int, float)) or init_timeout <= 0:
        raise ConfigError(f"--trainer.logger.init_args.init_timeout {init_timeout!r} must be > 0 (seconds)")


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with the mode decided up front, a short init timeout and one folder per run.

    name and version are empty for Lightning's path logic: save_dir is already the run folder, so
    ModelCheckpoint writes to <save_dir>/checkpoints and trainer.log_dir (grids, config.yaml) is save_dir.
    """

    def __init__(
        self,
        project: str = "gangen",  # W&B project (also the folder under save_dir)
        name: str | None = None,  # display name of the run; None: W&B picks one
        group: str | None = None,  # W&B group (e.g. one sweep or one experiment of several runs)
        tags: list[str] | None = None,  # W&B tags
        offline: bool | None = None,  # None: online if an API key is found, else offline with a warning
        save_dir: str = "runs",  # runs go to <save_dir>/<project>/<run id>/
        id: str | None = None,  # run id; pass an earlier run's id to resume it (same folder, same W&B run)
        log_model: bool | Literal["all"] = True,  # online only: checkpoints as artifacts (True: at the end)
        init_timeout: float = 15.0,  # seconds wandb.init may take before the run fails
        **kwargs: Any,  # more wandb.init arguments (entity, notes, job_type, ...)
    ) -> None:
        import wandb
        from wandb.sdk.lib.runid import generate_id

        check_settings(project, init_timeout)
        mode = wandb_mode(offline)
        launched = "LOCAL_RANK" in os.environ  # a process started by a DDP launcher: reuse the parent's id
        run_id = id or (os.environ.get("GANGEN_WANDB_RUN_ID") if launched else None) or generate_id()
        # a new id made here (not given, not the launching process's): `--ckpt_path last` may continue an
        # earlier run of the project instead (continue_run)
        self.new_id = not id and run_id != (os.environ.get("GANGEN_WANDB_RUN_ID") if launched else None)
        os.environ["GANGEN_WANDB_RUN_ID"] = run_id  # inherited by the processes DDP launches
        self._project_dir = Path(save_dir) / project
        self._run_dir = str(self._project_dir / run_id)
        # offline for want of a key: said when the run starts (`experiment`), in the folder it logs to then (the
        # run `--ckpt_path last` continues, not the new id drawn here)
        self._say_offline = mode == "offline" and offline is None and not os.environ.get("WANDB_MODE")
        if mode != "online":
            log_model = False  # artifacts need a server; the checkpoints stay in the run folder
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # the CLI passes every wandb.init option
        kwargs.setdefault("settings", wandb.Settings(init_timeout=init_timeout))
        super().__init__(
            name=name, save_dir=self._run_dir, offline=mode == "offline", id=run_id, project=project,
            log_model=log_model, group=group, tags=tags, mode=mode, **kwargs,
        )  # fmt: skip
        self.init_timeout = init_timeout
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # wandb warns about the setting even when it is None

    @property
    def project_dir(self) -> Path:
        """<save_dir>/<project>: one folder per run of the project in it, named by the run id."""
        return self._project_dir

    def continue_run(self, run_id: str) -> None:
        """Log into the earlier run `run_id` (its folder and W&B run), as `--trainer.logger.init_args.id run_id`
        would; before the run started (wandb.init), on every process."""
        if self._experiment is not None:
            raise RuntimeError("continue_run after the W&B run started")  # a bug, not user input
        self._run_dir = str(self._project_dir / run_id)
        self._save_dir = self._wandb_init["dir"] = self._run_dir
        self._id = self._wandb_init["id"] = run_id
        self.new_id = False
        os.environ["GANGEN_WANDB_RUN_ID"] = run_id  # the processes DDP launches continue it too

    @property
    def root_dir(self) -> str:
        """The run folder: `fit --ckpt_path last` looks for its checkpoints/last.ckpt there (same id)."""
        return self._run_dir

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def experiment(self) -> Any:
        """The wandb run; a run that cannot start (no network, server down) is one ConfigError line."""
        import wandb

        if self._experiment is None and rank_zero_only.rank == 0:  # the run folder before wandb.init: W&B
            Path(self._run_dir).mkdir(parents=True, exist_ok=True)  # looks for the git checkout from it (a
            # missing folder: "wandb: WARNING git root ... does not exist" and no git information)
            if self._say_offline:
                self._say_offline = False
                print(
                    f"gangen: W&B: no API key found (`wandb login` or WANDB_API_KEY), logging offline to "
                    f"{self._run_dir}/wandb; upload later with `wandb sync {self._run_dir}/wandb/offline-run-*`",
                    file=sys.stderr,
                    flush=True,
                )
        try:
            return super().experiment
        except (wandb.errors.Error, TimeoutError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            slow = isinstance(err, TimeoutError) or "timed out" in reason.lower()
            if self._wandb_init.get("mode") == "offline":  # no server: a slow local start, or a setting W&B refused
                fix = "raise --trainer.logger.init_args.init_timeout" if slow else "fix the W&B option it names"
                raise ConfigError(f"W&B's offline run did not start ({reason}): {fix}") from err
            raise ConfigError(
                f"W&B run did not start within {self.init_timeout:g} s at {wandb_host()} ({reason}): check the "
                "network or the key, or log offline with --trainer.logger.init_args.offline true"
            ) from err
