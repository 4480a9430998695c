# models tests (owned by the models component)
