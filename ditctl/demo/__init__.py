"""A self-contained demo world: procedurally drawn scenes (`scenes`) and a pixel-space
classifier that scores generated images of them (`concepts`)."""
