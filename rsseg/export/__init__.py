"""Export for serving: ONNX (with the model spec in its metadata) and its parity check against PyTorch."""

from rsseg.export.onnx import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    SPEC_KEY,
    ParityReport,
    assert_parity,
    check_exportable,
    check_parity,
    export_onnx,
    onnx_session,
    read_spec,
)

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "SPEC_KEY",
    "ParityReport",
    "assert_parity",
    "check_exportable",
    "check_parity",
    "export_onnx",
    "onnx_session",
    "read_spec",
]
