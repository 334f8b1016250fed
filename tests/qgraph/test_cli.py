"""qgraph.cli: the shared flags become a QuantConfig and a Calibration, value checks are argparse
errors, and library errors become one line and exit code 2."""
import argparse

import pytest

from qgraph import ConfigError, DataError, GraphError, QuantConfig, cli


def _parser():
    parser = argparse.ArgumentParser(prog="tool")
    cli.add_quant_args(parser)
    cli.add_calib_args(parser)
    return parser


def test_defaults_are_the_seeds_and_match_quantconfig():
    args = _parser().parse_args([])
    assert cli.config_from_args(args) == QuantConfig()
    assert cli.calibration_from_args(args).mode == "naive" and cli.calibration_from_args(args).epochs == 3


def test_every_quantization_flag_reaches_the_config():
    args = _parser().parse_args(["--weight-bits-width", "4", "--quant-type", "channel", "--input-signed", "auto",
                                 "--input-bits-width", "6", "--no-quantize-input", "--quantize-input-offline",
                                 "--online-stat", "mean_max", "--merge-bn", "--exclude-first-conv", "false",
                                 "--exclude-last-fc", "--exclude", "conv.*", "--exclude-op", "Deconvolution",
                                 "--wino-quantize", "F43", "--wino-mode", "full"])
    assert cli.config_from_args(args) == QuantConfig(
        weight_bits=4, quant_type="channel", input_signed="auto", input_bits=6, quantize_input=False, online=False,
        online_stat="mean_max", merge_bn=True, exclude_first_conv=False, exclude_last_fc=True, exclude=("conv.*",),
        exclude_ops=("Deconvolution",), winograd="F43", winograd_mode="full")


def test_target_arithmetic_flags_reach_the_config():
    args = _parser().parse_args(["--rounding", "half_even", "--quantize-bias"])
    assert cli.config_from_args(args) == QuantConfig(rounding="half_even", quantize_bias=True)


def test_calibration_flags():
    args = _parser().parse_args(["--calib-mode", "percentile", "--calib-epoch", "2", "--calib-batch-size", "32",
                                 "--percentile", "99.9"])
    calibration = cli.calibration_from_args(args)
    assert (calibration.mode, calibration.epochs, calibration.batch_size, calibration.percentile) == (
        "percentile", 2, 32, 99.9)
    assert cli.calibration_from_args(args, mode="kl").mode == "kl"


@pytest.mark.parametrize("argv", [["--weight-bits-width", "1"], ["--input-bits-width", "x"],
                                  ["--input-signed", "maybe"], ["--mean", "a,b,c"], ["--calib-mode", "magic"]])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2 and "tool: error:" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("1,3,32,32", (1, 3, 32, 32)), ("1x1x28x28", (1, 1, 28, 28))])
def test_shape_and_positive_values(text, value):
    assert cli.shape_arg(text) == value
    assert cli.positive_int("3") == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.shape_arg("1,0,3")


@pytest.mark.parametrize("error", [GraphError("node 'x' is bad"), ConfigError("--flag is bad"),
                                   DataError("file.rec: record 3 is bad"), FileNotFoundError("nope")])
def test_library_errors_become_one_line_and_exit_2(error, capsys):
    def run(args):
        raise error

    assert cli.run_reporting_errors("tool", run, None) == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: ") and len(err.strip().splitlines()) == 1 and str(error) in err


def test_success_returns_the_run_status():
    assert cli.run_reporting_errors("tool", lambda args: 0, None) == 0
