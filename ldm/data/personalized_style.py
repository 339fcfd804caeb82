"""Textual-inversion training data for an artistic style: the object dataset with style captions."""
from ldm.data import personalized
from ldm.data.templates import imagenet_dual_style_templates_small, imagenet_style_templates_small


class PersonalizedBase(personalized.PersonalizedBase):
    """Paintings in one style, captioned "a painting in the style of {}"; see the object dataset for the rest.

    Takes the object dataset's arguments, but `coarse_class_text` must stay None: a style has no object
    class to put before its placeholder.
    """

    templates = imagenet_style_templates_small
    dual_templates = imagenet_dual_style_templates_small
    accepts_coarse_class = False
