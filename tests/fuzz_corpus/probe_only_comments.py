# Hand-written probe (no crash found): suppression comments with empty or malformed code lists, and nothing else.
# pithlint: ignore[]
# noqa:
# pithlint: file-ignore[]
# noqa: ,,
