"""The run report: built from the manifest and output rows (`build`, `model`, `openai_batch`), drawn
(`charts`, `html`) with a sample gallery (`gallery`).
"""
