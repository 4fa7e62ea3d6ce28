"""Config presets this plugin ships; vizkit finds them through the ``vizkit.configs`` entry point."""
