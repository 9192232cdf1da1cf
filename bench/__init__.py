"""Maintained benchmarks, run from the repository root as `python -m bench.<name>`.

benchmark (this project beside the design's PyTorch code, one device; report: its table;
flops: the model FLOPs behind its utilisation), input_rate (the input pipeline's images/s),
stop_latency (signal to checkpoint), gpu_trace; run_gpu.sh is the one prepared GPU call.
"""
