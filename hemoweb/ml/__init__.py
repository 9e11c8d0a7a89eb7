"""hemoweb's machine-learning core: plain Python, no Django imports.

It takes paths, arrays, tensors and dataclasses, so it runs in a notebook, on a GPU box and in
tests without a database.
"""
