"""Ray Serve application builder for config-driven deployments (KubeRay's serveConfigV2):

    applications:
      - name: lorafleet
        import_path: serve.entrypoint:build
        args: {model: /models/base, adapters: [/adapters], ...}   # a ServeConfig

`args` is validated with the same pydantic schema as `lorafleet serve CONFIG.yaml`.
"""

from __future__ import annotations

from typing import Any

from lorafleet.config import ServeConfig


def build(args: dict[str, Any]):
    from lorafleet.models import resolve_model, wait_for_model
    from serve.deployment import build_app

    cfg = ServeConfig.model_validate(args)
    wait_for_model(cfg.model, cfg.model_wait_s)
    if cfg.http_listener == "replica":
        from lorafleet.errors import UserError

        raise UserError("http_listener replica is for `lorafleet serve`: in a RayService, Ray Serve's proxy "
                        "serves the port (serveConfigV2 http_options); leave http_listener at auto or proxy")
    return build_app(cfg, resolve_model(cfg.model))
