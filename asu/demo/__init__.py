"""The embedded demo: a seeded synthetic world of fictitious authors (:mod:`asu.demo.world`), a tiny Llama
trained from scratch to memorise it (:mod:`asu.demo.tiny`), and the end-to-end demo run
(:mod:`asu.demo.run`). Nothing here is needed to unlearn a real model; the library does not import it.
"""
