"""Side-by-side measurements, run as `python -m benchmarks.X` from the repository root; never imported by the
`specdesk` package.

* `bench`        the benchmark tables (core suite, speculation suite, load), with transformers and llama.cpp
* `step_profile` ms per engine step by phase, plain vs speculative
* `kernels_gpu`  the one prepared GPU script: kernels against their twins, kernel timings, the engine end to end
* `loadtest`     concurrent `/v1` clients against a running server (loopback only)
* `structured`   JSON-schema extraction: unconstrained vs grammar-constrained plain vs speculation + jump-forward
* `grammar_libs` xgrammar vs llguidance on this machine (why the engine's grammars use llguidance)
"""
