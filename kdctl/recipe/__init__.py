from kdctl.recipe.loader import load_recipe, recipe_json_schema
from kdctl.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_json_schema"]
