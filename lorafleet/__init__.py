"""lorafleet: fine-tune, merge and serve LoRA adapters."""

import logging as _logging

__version__ = "0.1.0"


class _NoHubKernelWarning(_logging.Filter):
    """bitsandbytes (0.50, CPU with AVX512-BF16) warns on import that it cannot fetch its optional
    4-bit GEMM kernel from the hub (`kernels` package); it then uses its own CPU op, and there is
    nothing for a user to do. Every other message of that logger stays."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelWarning())
