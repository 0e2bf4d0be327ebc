"""sendtime benchmarks: benchmark runs that compare against a baseline measured
in the same invocation, never timed tests (see GUIDE.md section 5).

    python -m benchmarks.ingest --json      event intake: gRPC stream and HTTP batch
"""
