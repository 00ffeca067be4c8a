"""Rows and their bytes: the record schema and error rows (`records`), object storage (`storage`), fetching
image bytes (`fetch`) and decoding them for the model (`images`). No Ray, no vLLM.
"""
