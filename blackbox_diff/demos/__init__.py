"""The demos that ship inside the package, so that ``blackbox-diff demo`` runs them from any install (a wheel
included). Each is a script with a docstring title, a ``main(argv)`` and a ``--fast`` setting; the other
examples live in the repository's examples/ folder.
"""
