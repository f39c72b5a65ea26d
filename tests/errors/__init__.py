"""Bad input (issue #6): a clear error that says what to do, and nothing left half-done.

Every test that checks an error on bad input lives here, by topic (the layers' own refusals
included), next to the edge cases that must not become errors (empty batches, a single sample,
modules that need no extension). Most cases run every extension: BatchGrad, BatchJacobian,
BatchL2Grad and dp.ClipGrad (``common.EXTENSIONS``). Cases marked ``xfail(strict=True)`` are what
jacext still gets wrong; their reason says what happens instead.
"""
