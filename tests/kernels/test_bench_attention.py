"""The paged attention benchmark's smoke run (make gpu-check runs it at full size on a GPU)."""

from lora_server.kernels import bench_attention


def test_the_attention_benchmark_runs_and_checks_its_kernels(monkeypatch, capsys):
    """`python -m lora_server.kernels.bench_attention --quick`, here with the Triton kernels interpreted: both tables
    print a torch and a triton column, and the kernels agreed with the baseline (the bench asserts it)."""
    monkeypatch.setattr("sys.argv", ["bench_attention", "--device", "cpu", "--quick"])
    bench_attention.main()
    out = capsys.readouterr().out
    assert "## decode" in out and "## prefill" in out
    header_rows = [line for line in out.splitlines() if line.startswith("| rows") or line.startswith("| chunks")]
    assert len(header_rows) == 2 and all("triton µs" in line and "torch µs" in line for line in header_rows)
