"""CASS (spec §4.10): the method, its spectral graph distillation and its text stage."""
