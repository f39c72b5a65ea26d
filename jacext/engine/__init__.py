"""The engine: from forward hooks to results, once for every active extension.

    forward hooks  ->  records on a tape  ->  a plan per backward  ->  rules (jacext.rules)  ->  results
      (hooks)           (record)              (plan, pullback, fused)                          (results)

* :mod:`jacext.engine.hooks`: the hooks ``jacext.extend`` installs and the recording session.
* :mod:`jacext.engine.demand`: what the active extensions ask, from their declared contract.
* :mod:`jacext.engine.record`: one record per call of a parameterised module, on a tape.
* :mod:`jacext.engine.plan`: how one backward turns the records into results.
* :mod:`jacext.engine.pullback`: the engine's own batched backward of every seed.
* :mod:`jacext.engine.fused`: calls whose parameter gradients the plan takes over.
* :mod:`jacext.engine.results`: the rules' results gathered and finished per parameter.
* :mod:`jacext.engine.memory`: result memory, reused where nothing else holds it.
* :mod:`jacext.engine.uses`: the guard against parameter uses no record covers.
* :mod:`jacext.engine.backpack_ctx`: the one adapter to BackPACK's global context.
"""
