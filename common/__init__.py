"""hotpath's shared layer: what every stage's commands need and nothing stage-specific.

    errors   UserError: a problem the user can fix (one line, exit code 2)
    cli      run(main), parser(), flag groups (sampling, corpus, threads, --json) and argparse validators
    files    atomic writes (temporary name, then rename), existing-file checks, hashing, one output file mode
    machine  CPU model, library versions, machine facts recorded beside every measurement
    timing   median-of-repeats timing after warm-up, interleaved A/B timing
    version  the installed hotpath version

It sits below every pipeline stage (model, export, quantize, serve, bench) and imports none of them; `kernels/`
stays standalone and imports no project package, this one included.
"""
