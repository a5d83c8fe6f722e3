"""Import every module that registers built-in methods (one import per module)."""
