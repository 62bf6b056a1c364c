"""The embedded default dataset: a learnable synthetic store in public raw formats.

`write_synthetic` simulates a shop and writes what a crawl of it would look like:

  output_dir/
    synthetic.json                      the summary `write_synthetic` returns
    amazon2018/Synthetic.json.gz        reviews, Amazon 2018 strict JSON lines
    amazon2018/meta_Synthetic.json.gz   item metadata, Amazon 2018 style
    regen/synthetic.jsonl.gz            REGEN schema, one user per line, plus per-entry
                                        `critique`, `endorsement`, `preferences`
    truth/users.jsonl.gz                latent user state (for evaluation only)
    truth/items.jsonl.gz                latent item attributes
    truth/world.json                    category tree and complementary types

Both formats hold the same users, items and interactions, except that REGEN keeps only
each user's most recent `regen_max_history` (50) purchases, as the public REGEN does.
The Amazon file is grouped by user (chronological within a user), not sorted by ASIN.
REGEN specifics: `item.description` is the Amazon description list joined by spaces,
`item.price` the same "$12.99" string, `rating` a float; `critique` is null on the first
kept entry (its predecessor is not in the line); `preferences` lists the user's
ground-truth statements at that step ("Likes ...", "Prefers ...", "Avoid ..."); metadata
scores are plausible made-up integers 1..5. truth/users.jsonl.gz holds each user's latent
state plus `history` (ASINs) and `moves` (why each item was picked).

World model (everything is drawn from `seed`):
  * A 4-level category tree, department > family > type > subtype, cut from a fixed
    vocabulary of 8 x 5 x 5 x 4 real-sounding names; its shape grows with `num_items`
    (about 25 items per leaf, at least 2) so small worlds still have dense leaves.
  * Items: a leaf, a brand of the leaf's department (brands have a quality tier and a
    Zipf popularity), a color, a material (per family), a style (per department) and a
    tier (0 budget .. 3 luxury) that set the title, description and price. Items are
    numbered in tree order, so every category node is a contiguous index range.
  * Popularity: log-normal(`popularity_sigma`) per item times a log-normal factor per
    leaf; the rank curve is Zipf-like and head shares hardly depend on the catalog size
    (a pure Zipf would hand one item several % of all purchases at 376K items). Every
    draw from a category node is popularity-weighted.
  * Users: liked types (2-4, mostly one department), 1-2 disliked types of that
    department, liked brands, two liked colors (one may drift to a new color mid-history),
    a disliked color, liked/disliked materials, a liked style and a price sensitivity.
  * Sequences: the next item comes from the previous item's leaf (30%), its type (15%)
    or family (10%), a fixed complementary type (10%), one of the user's liked types (25%)
    or exploration (10%); among K popularity-weighted candidates from that node the user
    picks by affinity (Gumbel-max), never re-buying an item while an alternative exists.
  * Ratings: 3.2 + 0.9 * affinity + 0.25 * tier + N(0, 0.9), rounded to 1..5 (mean ~4.2,
    half 5-star, ~2% 1-star at the default size); review text and summary
    mention the matching or clashing attributes and the price/quality fit.
  * Critiques: only between adjacent purchases in the same leaf (all 4 levels agree),
    phrased from how the new item differs from the previous one (color, price, tier,
    brand, material, style), most preference-relevant difference first; else null.
  * Coverage: each item is an "anchor" (a forced purchase) of `min_item_interactions`
    distinct users, dealt in catalog order over a random user permutation; a user's first
    anchor opens the history and seeds their liked types. The count is lowered when
    num_users * min(min_length, avg_length / 2) cannot fund it (see summary["world"]).
  * Timestamps: day resolution (as Amazon's), strictly increasing per user, 2005..2018.

Users are generated in chunks of `chunk_size` with `np.random.default_rng([seed, 1,
chunk])` and written as they are generated, so memory does not grow with `num_users`.
The output depends on `chunk_size` (keep the default for comparable data). Files are
byte-identical for the same arguments (gzip mtime 0, no stored file name).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import time
import types
from typing import Any, Sequence

import numpy as np

_quote = json.encoder.encode_basestring_ascii  # str -> JSON string literal, C speed

FORMATS = ("amazon2018", "regen")
VERSION = 1

# ---------------------------------------------------------------------------------------
# Vocabulary. Department: (families, styles, material verb, benefits, uses, base price).
# Family: (name, types, subtype modifiers, materials).

_TREE: tuple = (
    ("Clothing, Shoes & Jewelry", (
        ("Women's Clothing", ("Dresses", "Tops & Tees", "Sweaters", "Jeans", "Leggings"),
         ("Casual", "Petite", "Plus Size", "Maternity"),
         ("cotton", "polyester", "linen", "rayon", "spandex blend")),
        ("Men's Clothing", ("T-Shirts", "Dress Shirts", "Hoodies", "Jeans", "Shorts"),
         ("Slim Fit", "Classic Fit", "Athletic Fit", "Big & Tall"),
         ("cotton", "polyester", "fleece", "denim", "wool blend")),
        ("Shoes", ("Sneakers", "Boots", "Sandals", "Loafers", "Slippers"),
         ("Women's", "Men's", "Girls'", "Boys'"),
         ("leather", "suede", "canvas", "mesh", "synthetic leather")),
        ("Jewelry", ("Necklaces", "Earrings", "Bracelets", "Rings", "Watches"),
         ("Fashion", "Fine", "Vintage", "Minimalist"),
         ("sterling silver", "gold-plated brass", "stainless steel", "rose gold", "titanium")),
        ("Accessories", ("Hats", "Scarves", "Belts", "Wallets", "Sunglasses"),
         ("Women's", "Men's", "Kids'", "Unisex"),
         ("leather", "wool", "cotton", "acrylic", "polycarbonate")),
    ), ("casual", "classic", "sporty", "bohemian", "vintage"), "Made from",
     ("all-day comfort", "a flattering fit", "easy care", "breathable wear"),
     ("everyday wear", "weekends out", "the office", "travel"), 28.0),
    ("Home & Kitchen", (
        ("Cookware", ("Skillets", "Saucepans", "Dutch Ovens", "Stock Pots", "Woks"),
         ("Nonstick", "Induction-Ready", "Oven-Safe", "Compact"),
         ("cast iron", "stainless steel", "aluminum", "copper", "ceramic-coated steel")),
        ("Kitchen Utensils & Gadgets", ("Spatulas", "Chef Knives", "Cutting Boards", "Measuring Cups",
                                        "Peelers"),
         ("Professional", "Everyday", "Ergonomic", "Dishwasher-Safe"),
         ("stainless steel", "silicone", "bamboo", "acacia wood", "BPA-free plastic")),
        ("Bedding", ("Sheet Sets", "Comforters", "Pillows", "Duvet Covers", "Blankets"),
         ("Twin", "Full", "Queen", "King"),
         ("cotton", "microfiber", "linen", "bamboo viscose", "flannel")),
        ("Home Decor", ("Throw Pillows", "Wall Art", "Candles", "Vases", "Picture Frames"),
         ("Living Room", "Bedroom", "Outdoor", "Seasonal"),
         ("ceramic", "glass", "reclaimed wood", "metal", "canvas")),
        ("Storage & Organization", ("Storage Bins", "Shelves", "Drawer Organizers", "Hangers",
                                    "Baskets"),
         ("Closet", "Pantry", "Bathroom", "Garage"),
         ("plastic", "bamboo", "metal", "fabric", "wicker")),
    ), ("modern", "rustic", "farmhouse", "minimalist", "classic"), "Crafted from",
     ("lasting durability", "easy cleaning", "everyday convenience", "a tidy home"),
     ("daily cooking", "busy families", "small apartments", "entertaining guests"), 32.0),
    ("Office Products", (
        ("Writing Instruments", ("Ballpoint Pens", "Gel Pens", "Markers", "Pencils", "Highlighters"),
         ("Fine Point", "Medium Point", "Bold Point", "Assorted Color"),
         ("plastic", "metal", "wood", "rubber grip", "recycled plastic")),
        ("Paper", ("Notebooks", "Copy Paper", "Sticky Notes", "Index Cards", "Legal Pads"),
         ("Ruled", "Grid", "Blank", "Recycled"),
         ("recycled paper", "bright white paper", "kraft paper", "cardstock", "acid-free paper")),
        ("Desk Accessories", ("Desk Organizers", "Staplers", "Tape Dispensers", "Pen Holders",
                              "Desk Lamps"),
         ("Home Office", "Executive", "Compact", "Heavy Duty"),
         ("metal mesh", "walnut wood", "acrylic", "plastic", "faux leather")),
        ("Office Electronics", ("Calculators", "Label Makers", "Paper Shredders", "Printers",
                                "Headsets"),
         ("Portable", "Desktop", "Wireless", "Heavy Duty"),
         ("plastic", "aluminum", "steel", "rubberized plastic", "matte plastic")),
        ("Binders & Filing", ("Binders", "File Folders", "Sheet Protectors", "Expanding Files",
                              "Tab Dividers"),
         ("Letter Size", "Legal Size", "Heavy Duty", "Colored"),
         ("vinyl", "polypropylene", "cardstock", "kraft board", "poly")),
    ), ("professional", "colorful", "minimalist", "classic", "modern"), "Made of",
     ("smooth everyday use", "a tidy workspace", "reliable performance", "long-lasting use"),
     ("the office", "school", "home offices", "students"), 14.0),
    ("Sports & Outdoors", (
        ("Camping & Hiking", ("Tents", "Sleeping Bags", "Backpacks", "Headlamps", "Camp Chairs"),
         ("Ultralight", "Family", "Backpacking", "Car Camping"),
         ("nylon", "polyester", "ripstop nylon", "aluminum", "canvas")),
        ("Exercise & Fitness", ("Yoga Mats", "Dumbbells", "Resistance Bands", "Jump Ropes",
                                "Foam Rollers"),
         ("Home Gym", "Travel", "Beginner", "Pro"),
         ("rubber", "neoprene", "foam", "latex", "steel")),
        ("Cycling", ("Bike Helmets", "Bike Lights", "Bike Locks", "Cycling Gloves", "Water Bottles"),
         ("Road", "Mountain", "Commuter", "Kids'"),
         ("polycarbonate", "aluminum", "hardened steel", "silicone", "nylon")),
        ("Water Sports", ("Swim Goggles", "Life Jackets", "Snorkel Sets", "Dry Bags", "Paddles"),
         ("Adult", "Youth", "Competition", "Recreational"),
         ("silicone", "neoprene", "PVC", "nylon", "fiberglass")),
        ("Team Sports", ("Soccer Balls", "Basketballs", "Baseball Gloves", "Shin Guards",
                         "Training Cones"),
         ("Official Size", "Youth", "Practice", "Indoor"),
         ("synthetic leather", "rubber", "full-grain leather", "polyurethane", "plastic")),
    ), ("sporty", "rugged", "lightweight", "classic", "high-visibility"), "Built with",
     ("serious training", "outdoor durability", "weekend adventures", "reliable grip"),
     ("the trail", "the gym", "weekend trips", "daily workouts"), 36.0),
    ("Beauty & Personal Care", (
        ("Skin Care", ("Moisturizers", "Cleansers", "Serums", "Sunscreens", "Face Masks"),
         ("Dry Skin", "Oily Skin", "Sensitive Skin", "Anti-Aging"),
         ("hyaluronic acid", "vitamin C", "aloe vera", "shea butter", "retinol")),
        ("Hair Care", ("Shampoos", "Conditioners", "Hair Oils", "Styling Gels", "Hair Masks"),
         ("Curly Hair", "Color-Treated", "Volumizing", "Men's"),
         ("argan oil", "coconut oil", "keratin", "tea tree oil", "biotin")),
        ("Makeup", ("Lipsticks", "Foundations", "Mascaras", "Eyeshadow Palettes", "Blushes"),
         ("Long-Wear", "Matte", "Natural Finish", "Waterproof"),
         ("a vegan formula", "a mineral formula", "a cream formula", "a powder formula",
          "a liquid formula")),
        ("Fragrance", ("Eau de Parfum", "Body Mists", "Colognes", "Perfume Oils", "Gift Sets"),
         ("Women's", "Men's", "Unisex", "Travel Size"),
         ("vanilla notes", "citrus notes", "floral notes", "sandalwood", "lavender")),
        ("Tools & Accessories", ("Makeup Brushes", "Hair Dryers", "Flat Irons", "Nail Clippers",
                                 "Tweezers"),
         ("Professional", "Travel", "Salon", "Everyday"),
         ("stainless steel", "ceramic", "tourmaline", "synthetic bristles", "titanium")),
    ), ("natural", "luxurious", "minimalist", "bold", "classic"), "Formulated with",
     ("visible results", "gentle daily care", "a salon finish", "long-lasting wear"),
     ("morning routines", "sensitive skin", "travel", "special occasions"), 18.0),
    ("Electronics", (
        ("Headphones", ("Earbuds", "Over-Ear Headphones", "On-Ear Headphones", "Sports Earphones",
                        "Gaming Headsets"),
         ("Wireless", "Wired", "Noise Cancelling", "Kids'"),
         ("plastic", "aluminum", "memory foam", "silicone", "protein leather")),
        ("Computer Accessories", ("Keyboards", "Mice", "USB Hubs", "Laptop Stands", "Webcams"),
         ("Wireless", "Ergonomic", "Gaming", "Portable"),
         ("aluminum", "ABS plastic", "steel", "silicone", "matte plastic")),
        ("Cell Phone Accessories", ("Phone Cases", "Chargers", "Screen Protectors", "Car Mounts",
                                    "Power Banks"),
         ("Universal", "Slim", "Rugged", "Fast-Charging"),
         ("silicone", "TPU", "tempered glass", "aluminum", "vegan leather")),
        ("Camera & Photo", ("Tripods", "Camera Bags", "Memory Cards", "Lens Filters", "Ring Lights"),
         ("Travel", "Professional", "Vlogging", "Compact"),
         ("aluminum", "carbon fiber", "nylon", "optical glass", "plastic")),
        ("Smart Home", ("Smart Plugs", "Smart Bulbs", "Security Cameras", "Video Doorbells",
                        "Thermostats"),
         ("Wi-Fi", "Indoor", "Outdoor", "Voice Control"),
         ("plastic", "aluminum", "glass", "weatherproof plastic", "steel")),
    ), ("sleek", "rugged", "compact", "premium", "retro"), "Built with",
     ("crisp performance", "all-day battery life", "easy setup", "reliable connectivity"),
     ("commuting", "working from home", "gaming", "travel"), 42.0),
    ("Toys & Games", (
        ("Building Toys", ("Building Sets", "Magnetic Tiles", "Marble Runs", "Stacking Blocks",
                           "Construction Kits"),
         ("Toddler", "Preschool", "Kids'", "Teen & Adult"),
         ("plastic", "wood", "magnetic plastic", "foam", "cardboard")),
        ("Puzzles", ("Jigsaw Puzzles", "3D Puzzles", "Brain Teasers", "Floor Puzzles", "Puzzle Mats"),
         ("1000 Piece", "500 Piece", "Kids'", "Adult"),
         ("cardboard", "wood", "foam", "plastic", "metal")),
        ("Board Games", ("Strategy Games", "Party Games", "Card Games", "Family Games", "Dice Games"),
         ("2-Player", "Family", "Cooperative", "Travel"),
         ("cardboard", "wood", "plastic", "linen-finish card", "metal")),
        ("Dolls & Accessories", ("Fashion Dolls", "Baby Dolls", "Dollhouses", "Doll Clothes",
                                 "Action Figures"),
         ("Classic", "Collector", "Playset", "Deluxe"),
         ("vinyl", "plastic", "fabric", "wood", "soft plush")),
        ("Outdoor Play", ("Kites", "Water Blasters", "Sandbox Toys", "Bubble Machines",
                          "Flying Discs"),
         ("Beach", "Backyard", "Park", "Pool"),
         ("nylon", "plastic", "foam", "ripstop fabric", "rubber")),
    ), ("educational", "classic", "colorful", "collectible", "creative"), "Made from",
     ("hours of play", "hands-on learning", "family fun", "safe play"),
     ("rainy days", "birthdays", "family game night", "classrooms"), 24.0),
    ("Tools & Home Improvement", (
        ("Power Tools", ("Drills", "Circular Saws", "Sanders", "Impact Drivers", "Oscillating Tools"),
         ("Cordless", "Corded", "Compact", "Heavy Duty"),
         ("steel", "aluminum", "composite", "magnesium", "glass-filled nylon")),
        ("Hand Tools", ("Screwdriver Sets", "Wrenches", "Hammers", "Pliers", "Tape Measures"),
         ("Professional", "Homeowner", "Precision", "Heavy Duty"),
         ("chrome vanadium steel", "forged steel", "fiberglass", "carbon steel", "titanium")),
        ("Lighting", ("LED Bulbs", "Ceiling Lights", "Floor Lamps", "Under Cabinet Lights",
                      "String Lights"),
         ("Dimmable", "Smart", "Outdoor", "Energy-Saving"),
         ("glass", "aluminum", "brass", "plastic", "linen shade")),
        ("Paint Supplies", ("Paint Brushes", "Paint Rollers", "Painter's Tape", "Drop Cloths",
                            "Paint Trays"),
         ("Interior", "Exterior", "Trim", "Contractor"),
         ("nylon", "polyester", "canvas", "plastic", "natural bristle")),
        ("Hardware", ("Door Hinges", "Cabinet Knobs", "Wall Anchors", "Wall Hooks", "Door Locks"),
         ("Interior", "Exterior", "Heavy Duty", "Decorative"),
         ("zinc alloy", "stainless steel", "solid brass", "iron", "nylon")),
    ), ("professional-grade", "compact", "rugged", "modern", "classic"), "Constructed from",
     ("clean, precise results", "jobsite durability", "quick installs", "weekend projects"),
     ("DIY projects", "contractors", "home repairs", "renovations"), 45.0),
)
_MAX_SHAPE = (8, 5, 5, 4)

_COLORS = ("Black", "White", "Navy", "Gray", "Blue", "Red", "Green", "Beige", "Pink", "Brown",
           "Purple", "Teal", "Yellow", "Silver")
_COLOR_WEIGHTS = np.array([10, 8, 6, 6, 5, 4, 4, 3, 3, 3, 2, 2, 2, 2], np.float64)
_TIERS = ("budget", "standard", "premium", "luxury")
_TIER_PRICE = np.array([0.55, 1.0, 1.7, 3.0])
_TIER_TEXT = ("An affordable choice for everyday use.", "Reliable quality at a fair price.",
              "Premium construction built to last.",
              "Luxury craftsmanship with meticulous attention to detail.")
# Plural type names that are also the singular noun.
_SAME_SINGULAR = ("Jeans", "Leggings", "Shorts", "Sunglasses", "Headphones", "Earphones", "Headsets",
                  "Glasses", "Eau de Parfum", "Pliers", "Tops & Tees", "Sheet Sets", "Gift Sets",
                  "Snorkel Sets", "Building Sets", "Screwdriver Sets", "Drop Cloths")
_BRAND_HEADS = ("Nor", "Cal", "Ver", "Ash", "Bel", "Lum", "Or", "Sol", "Ter", "Zen", "Mar", "Kin",
                "Hal", "Ever", "Bri", "Van", "Pel", "Tru", "Oak", "Sil", "Ard", "Bra", "Cor", "Dal",
                "Fen", "Gar", "Hux", "Ivo", "Jun", "Kes", "Lyn", "Mon", "Nov", "Pax", "Quin", "Ros",
                "Sav", "Tal", "Ul", "Wes")
_BRAND_MIDS = ("", "a", "o", "i", "el", "ar", "en", "is")
_BRAND_TAILS = ("vik", "dera", "ton", "ly", "wood", "stone", "field", "craft", "line", "ora", "ex",
                "io", "ium", "wave", "haven", "mark", "ridge", "bay", "ford", "lux", "ova", "nix",
                "way", "port", "dale", "well", "brook", "vale", "rise", "ette")
_BRAND_WORDS = ("Co.", "Goods", "Supply", "Studio", "Works", "Labs", "Collective", "Brands")
_FIRST_NAMES = ("Jennifer", "Michael", "Sarah", "David", "Linda", "James", "Karen", "Robert", "Emily",
                "John", "Jessica", "Chris", "Amanda", "Daniel", "Laura", "Mark", "Nicole", "Kevin",
                "Rachel", "Brian", "Megan", "Steven", "Ashley", "Paul", "Maria", "Jason", "Heather",
                "Eric", "Angela", "Tom", "Lisa", "Anna", "Mike", "Susan", "Kim", "Joe", "Beth", "Sam",
                "Pat", "Alex")

_STEP_MOVES = ("anchor", "same_leaf", "same_type", "same_family", "complement", "liked_type",
               "explore")
_MOVE_P = np.array([0.30, 0.15, 0.10, 0.10, 0.25, 0.10])  # moves 1..6 after the first step
_MAX_T = 2**31 - 1

# Affinity weights: what the user gains from each match (negative for clashes).
_W_LIKED_TYPE, _W_DIS_TYPE = 1.0, -2.0
_W_BRAND, _W_COLOR, _W_DIS_COLOR = 0.8, 0.7, -1.2
_W_MAT, _W_DIS_MAT, _W_STYLE = 0.6, -1.0, 0.4
# Match flags (bits) recorded per interaction for the text templates.
(F_TYPE, F_DIS_TYPE, F_BRAND, F_COLOR, F_DIS_COLOR, F_MAT, F_DIS_MAT,
 F_STYLE) = (1 << i for i in range(8))


def _singular(name: str) -> str:
  if name in _SAME_SINGULAR:
    return name
  if name.endswith(("sses", "shes", "ches", "xes")):
    return name[:-2]
  if name.endswith("ies"):
    return name[:-3] + "y"
  if name.endswith("s"):
    return name[:-1]
  return name


def _shape_for(num_items: int) -> tuple[int, int, int, int]:
  """Tree shape with about 25 items per leaf (>= 4), grown one level at a time."""
  target = max(min(16, num_items // 4), num_items // 25, 1)
  shape = [1, 1, 1, 1]
  level = 0
  while int(np.prod(shape)) < target and shape != list(_MAX_SHAPE):
    if shape[level] < _MAX_SHAPE[level]:
      shape[level] += 1
      if int(np.prod(shape)) > num_items // 2:  # keep >= 2 items per leaf
        shape[level] -= 1
        break
    level = (level + 1) % 4
  return tuple(shape)


def _base36(x: int, width: int) -> str:
  digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
  out = []
  for _ in range(width):
    x, r = divmod(x, 36)
    out.append(digits[r])
  return "".join(reversed(out))


def _asin(index: int, seed: int) -> str:
  # index -> (a * index + b) mod 36^8 is a bijection (a coprime to 36): unique, scrambled ids.
  return "B0" + _base36(((index + 1_000_003 * (seed + 1)) * 1_594_323_557) % 36**8, 8)


def _reviewer_id(index: int, seed: int) -> str:
  return "A" + _base36(((index + 1_000_003 * (seed + 1)) * 2_654_435_761_477) % 36**13, 13)


def _price_text(price: float) -> str:
  return f"${price:.2f}"


# ---------------------------------------------------------------------------------------
# The world: category tree, brands, items.

@dataclasses.dataclass
class _World:
  shape: tuple[int, int, int, int]
  dept_names: list[str]
  fam_names: list[str]  # per family (global index)
  type_names: list[str]
  type_nouns: list[str]  # lower-case singular noun per type
  type_paths: list[tuple[str, str, str]]
  leaf_names: list[str]
  leaf_paths: list[tuple[str, str, str, str]]
  fam_dept: np.ndarray
  type_fam: np.ndarray
  leaf_type: np.ndarray
  comp_types: np.ndarray  # (types, 2) complementary types
  fam_mats: np.ndarray  # (families, 5) material ids
  dept_styles: np.ndarray  # (departments, 5) style ids
  materials: list[str]
  styles: list[str]
  dept_info: list[tuple]  # (material verb, benefits, uses)
  brand_names: list[str]
  brand_dept: np.ndarray
  brand_tier: np.ndarray
  brand_start: np.ndarray  # (departments + 1) brand ranges per department
  brand_cum: np.ndarray  # cumulative brand popularity, with a leading 0
  # Items, in tree order (so every node is an index range).
  item_leaf: np.ndarray
  item_type: np.ndarray
  item_fam: np.ndarray
  item_dept: np.ndarray
  item_brand: np.ndarray
  item_color: np.ndarray
  item_mat: np.ndarray
  item_style: np.ndarray
  item_tier: np.ndarray
  item_price: np.ndarray
  item_pop: np.ndarray
  pop_cum: np.ndarray  # cumulative popularity, leading 0 (len items + 1)
  leaf_start: np.ndarray
  type_start: np.ndarray
  fam_start: np.ndarray
  dept_start: np.ndarray
  asins: list[str]
  titles: list[str]
  descriptions: list[list[str]]
  prices: list[str]


def _build_world(num_items: int, seed: int, shape, popularity_sigma: float) -> _World:
  rng = np.random.default_rng([seed, 0])
  nd, nf, nt, ns = shape
  dept_names, fam_names, type_names, leaf_names, leaf_paths = [], [], [], [], []
  fam_dept, type_fam, leaf_type, dept_info, dept_style_names, fam_mat_names = [], [], [], [], [], []
  dept_base = []
  for d, (dname, families, styles, verb, benefits, uses, base) in enumerate(_TREE[:nd]):
    dept_names.append(dname)
    dept_info.append((verb, benefits, uses))
    dept_style_names.append(styles)
    dept_base.append(base)
    for fname, types, modifiers, mats in families[:nf]:
      f = len(fam_names)
      fam_names.append(fname)
      fam_dept.append(d)
      fam_mat_names.append(mats)
      for tname in types[:nt]:
        t = len(type_names)
        type_names.append(tname)
        type_fam.append(f)
        for modifier in modifiers[:ns]:
          leaf_names.append(f"{modifier} {tname}")
          leaf_paths.append((dname, fname, tname, f"{modifier} {tname}"))
          leaf_type.append(t)
  fam_dept, type_fam, leaf_type = np.array(fam_dept), np.array(type_fam), np.array(leaf_type)
  type_dept = fam_dept[type_fam]
  n_types, n_leaves = len(type_names), len(leaf_names)
  materials = sorted({m for mats in fam_mat_names for m in mats})
  styles = sorted({s for ss in dept_style_names for s in ss})
  fam_mats = np.array([[materials.index(m) for m in mats] for mats in fam_mat_names])
  dept_styles = np.array([[styles.index(s) for s in ss] for ss in dept_style_names])

  # Complements: two fixed types of the same department, preferably of another family.
  comp = np.zeros((n_types, 2), np.int64)
  for t in range(n_types):
    same_dept = np.nonzero(type_dept == type_dept[t])[0]
    other = same_dept[type_fam[same_dept] != type_fam[t]]
    if len(other) == 0:
      other = same_dept[same_dept != t]
    if len(other) == 0:
      other = np.array([t])
    comp[t] = rng.choice(other, 2, replace=len(other) < 2)

  # Leaf sizes: lognormal shares, at least 2 items each.
  share = rng.lognormal(0.0, 0.5, n_leaves)
  counts = 2 + rng.multinomial(num_items - 2 * n_leaves, share / share.sum())
  item_leaf = np.repeat(np.arange(n_leaves), counts)
  item_type = leaf_type[item_leaf]
  item_fam = type_fam[item_type]
  item_dept = fam_dept[item_fam]
  leaf_start = np.concatenate([[0], np.cumsum(counts)])
  type_start = leaf_start[np.searchsorted(leaf_type, np.arange(n_types + 1))]
  fam_start = type_start[np.searchsorted(type_fam, np.arange(len(fam_names) + 1))]
  dept_start = fam_start[np.searchsorted(fam_dept, np.arange(nd + 1))]

  # Brands: unique generated names, grouped by department, Zipf popularity, a home tier.
  dept_items = np.diff(dept_start)
  per_dept = np.maximum(4, np.round(dept_items / 30.0)).astype(np.int64)
  n_cores = len(_BRAND_HEADS) * len(_BRAND_MIDS) * len(_BRAND_TAILS)
  per_dept = np.minimum(per_dept, n_cores // nd)
  n_brands = int(per_dept.sum())
  cores = rng.choice(n_cores, n_brands, replace=False)
  brand_names = []
  for c in cores.tolist():
    h, rest = divmod(c, len(_BRAND_MIDS) * len(_BRAND_TAILS))
    m, t = divmod(rest, len(_BRAND_TAILS))
    brand_names.append((_BRAND_HEADS[h] + _BRAND_MIDS[m] + _BRAND_TAILS[t]).capitalize())
  words = rng.integers(0, 4 * len(_BRAND_WORDS), n_brands)  # 1 in 4 gets a second word
  brand_names = [f"{n} {_BRAND_WORDS[w]}" if w < len(_BRAND_WORDS) else n
                 for n, w in zip(brand_names, words.tolist())]
  brand_dept = np.repeat(np.arange(nd), per_dept)
  brand_start = np.concatenate([[0], np.cumsum(per_dept)])
  brand_tier = rng.choice(4, n_brands, p=[0.3, 0.4, 0.2, 0.1])
  brand_pop = np.empty(n_brands)
  for d in range(nd):
    lo, hi = brand_start[d], brand_start[d + 1]
    brand_pop[lo:hi] = 1.0 / (1.0 + rng.permutation(hi - lo)) ** 0.9
  brand_cum = np.concatenate([[0.0], np.cumsum(brand_pop)])

  # Items: brand of the department, attributes, tier near the brand's, price.
  u = rng.random(num_items)
  lo, hi = brand_cum[brand_start[item_dept]], brand_cum[brand_start[item_dept + 1]]
  item_brand = np.searchsorted(brand_cum, lo + u * (hi - lo), side="right") - 1
  item_brand = np.clip(item_brand, brand_start[item_dept], brand_start[item_dept + 1] - 1)
  item_color = rng.choice(len(_COLORS), num_items, p=_COLOR_WEIGHTS / _COLOR_WEIGHTS.sum())
  item_mat = fam_mats[item_fam, rng.integers(0, 5, num_items)]
  item_style = dept_styles[item_dept, rng.integers(0, 5, num_items)]
  item_tier = np.clip(brand_tier[item_brand] + rng.choice([-1, 0, 0, 0, 1], num_items), 0, 3)
  type_base = np.array(dept_base)[type_dept] * rng.lognormal(0.0, 0.35, n_types)
  raw = type_base[item_type] * _TIER_PRICE[item_tier] * rng.lognormal(0.0, 0.2, num_items)
  item_price = np.maximum(np.floor(raw), 0.0) + rng.choice([0.99, 0.49, 0.95, 0.0], num_items,
                                                           p=[0.6, 0.15, 0.15, 0.1])
  item_price = np.where(item_price < 1.0, item_price + 1.0, item_price)
  # Log-normal popularity times a per-leaf factor (some subtypes sell far more). Its
  # rank curve is Zipf-like, and head shares do not depend on the catalog size.
  leaf_factor = rng.lognormal(0.0, 1.0, n_leaves)
  item_pop = leaf_factor[item_leaf] * rng.lognormal(0.0, popularity_sigma, num_items)
  pop_cum = np.concatenate([[0.0], np.cumsum(item_pop)])

  type_nouns = [_singular(n).lower() for n in type_names]
  asins = [_asin(i, seed) for i in range(num_items)]
  prices = [_price_text(p) for p in item_price.tolist()]
  titles, descriptions = [], []
  r = rng.integers(0, 1 << 30, (num_items, 4)).tolist()
  modifiers = [p[3][: -len(type_names[leaf_type[i]]) - 1] for i, p in enumerate(leaf_paths)]
  for i in range(num_items):
    leaf, t, d = int(item_leaf[i]), int(item_type[i]), int(item_dept[i])
    brand, color = brand_names[item_brand[i]], _COLORS[item_color[i]]
    mat, style = materials[item_mat[i]], styles[item_style[i]]
    noun = _singular(type_names[t])
    ri = r[i]
    mat_word = mat[2:] if mat.startswith("a ") else mat
    style_word = f"{style.capitalize()} " if ri[0] % 5 < 2 else ""
    titles.append(f"{brand} {modifiers[leaf]} {style_word}{_title_case(mat_word)} {noun}, {color}")
    verb, benefits, uses = dept_info[d]
    desc = [f"{verb} {mat} for {benefits[ri[1] % 4]}.",
            f"A {style} {noun.lower()} in {color.lower()}, designed for {uses[ri[2] % 4]}.",
            _TIER_TEXT[item_tier[i]]]
    if ri[3] % 3 == 0:
      desc.append(f"From {brand}: backed by our satisfaction guarantee.")
    descriptions.append(desc)
  type_paths = [leaf_paths[int(np.searchsorted(leaf_type, t))][:3] for t in range(n_types)]
  return _World(
      shape=tuple(shape), dept_names=dept_names, fam_names=fam_names, type_names=type_names,
      type_nouns=type_nouns, type_paths=type_paths, leaf_names=leaf_names, leaf_paths=leaf_paths,
      fam_dept=fam_dept,
      type_fam=type_fam, leaf_type=leaf_type, comp_types=comp, fam_mats=fam_mats,
      dept_styles=dept_styles, materials=materials, styles=styles, dept_info=dept_info,
      brand_names=brand_names, brand_dept=brand_dept, brand_tier=brand_tier,
      brand_start=brand_start, brand_cum=brand_cum, item_leaf=item_leaf, item_type=item_type,
      item_fam=item_fam, item_dept=item_dept, item_brand=item_brand, item_color=item_color,
      item_mat=item_mat, item_style=item_style, item_tier=item_tier, item_price=item_price,
      item_pop=item_pop, pop_cum=pop_cum, leaf_start=leaf_start, type_start=type_start,
      fam_start=fam_start, dept_start=dept_start, asins=asins, titles=titles,
      descriptions=descriptions, prices=prices)


def _title_case(text: str) -> str:
  return " ".join(w if w.isupper() else w[:1].upper() + w[1:] for w in text.split())


# ---------------------------------------------------------------------------------------
# Users and their histories, one chunk at a time (vectorised over users, looped over steps).

@dataclasses.dataclass
class _Users:
  index: np.ndarray  # global user index
  length: np.ndarray
  liked_types: np.ndarray  # (n, 4), -1 padded, packed left
  dis_types: np.ndarray  # (n, 2)
  liked_brands: np.ndarray  # (n, 2)
  liked_colors: np.ndarray  # (n, 2); slot 0 drifts to drift_color at drift_step
  drift_step: np.ndarray
  drift_color: np.ndarray
  dis_color: np.ndarray
  liked_mats: np.ndarray  # (n, 2)
  dis_mat: np.ndarray
  liked_style: np.ndarray
  sensitivity: np.ndarray  # price sensitivity in [0, 1]
  primary: np.ndarray
  secondary: np.ndarray
  anchors: np.ndarray  # (n, A) forced items, -1 padded
  hist: np.ndarray = None  # (n, Lmax) items
  moves: np.ndarray = None  # (n, Lmax) index into _STEP_MOVES
  days: np.ndarray = None  # (n, Lmax) day numbers since the epoch
  ratings: np.ndarray = None
  flags: np.ndarray = None
  dup: int = 0


def _pack_left(a: np.ndarray) -> np.ndarray:
  """Moves the -1 entries of each row to the end, keeping the others' order."""
  order = np.argsort(a < 0, axis=1, kind="stable")
  return np.take_along_axis(a, order, axis=1)


def _drop_repeats(a: np.ndarray, also: np.ndarray | None = None) -> np.ndarray:
  """Sets entries equal to an earlier entry of the row (or to any of `also`) to -1."""
  a = a.copy()
  for j in range(a.shape[1]):
    seen = a[:, :j] == a[:, j:j + 1]
    if also is not None:
      seen = np.concatenate([seen, also == a[:, j:j + 1]], axis=1)
    a[seen.any(axis=1), j] = -1
  return a


def _sample_range(rng, cum: np.ndarray, lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray:
  """k weighted draws per row from index ranges [lo, hi) of weights with cumsum `cum`."""
  u = rng.random((len(lo), k))
  base, span = cum[lo][:, None], (cum[hi] - cum[lo])[:, None]
  idx = np.searchsorted(cum, base + u * span, side="right") - 1
  return np.clip(idx, lo[:, None], (hi - 1)[:, None])


def _make_users(w: _World, rng, index: np.ndarray, anchors: np.ndarray, p: dict) -> _Users:
  n = len(index)
  nd = w.shape[0]
  n_items = len(w.item_leaf)
  # Seed type: the first anchor's, else a popularity-weighted random type.
  rand_item = _sample_range(rng, w.pop_cum, np.zeros(n, np.int64), np.full(n, n_items), 1)[:, 0]
  seed_item = np.where(anchors[:, 0] >= 0, anchors[:, 0], rand_item)
  seed_type = w.item_type[seed_item]
  primary = w.item_dept[seed_item]
  secondary = rng.integers(0, nd, n)
  secondary = np.where((rng.random(n) < 0.4) & (secondary != primary), secondary, -1)

  def types_in(dept: np.ndarray) -> np.ndarray:  # popularity-weighted
    item = _sample_range(rng, w.pop_cum, w.dept_start[dept], w.dept_start[dept + 1], 1)[:, 0]
    return w.item_type[item]

  liked = np.full((n, 4), -1, np.int64)
  liked[:, 0] = seed_type
  for j in range(1, 4):
    use_second = (secondary >= 0) & (rng.random(n) < 0.35)
    liked[:, j] = types_in(np.where(use_second, secondary, primary))
  k_like = rng.integers(2, 5, n)
  liked[np.arange(4)[None, :] >= k_like[:, None]] = -1
  liked = _pack_left(_drop_repeats(liked))
  # Disliked types: uniform over the primary department's types, never liked.
  type_dept = w.fam_dept[w.type_fam]
  tlo = np.searchsorted(type_dept, primary)
  thi = np.searchsorted(type_dept, primary, side="right")
  draws = tlo[:, None] + (rng.random((n, 6)) * (thi - tlo)[:, None]).astype(np.int64)
  dis = _pack_left(_drop_repeats(draws, also=liked))[:, :2].copy()
  dis[rng.random(n) < 0.5, 1] = -1
  # Brands: 1-2 of the primary department, popularity-weighted.
  brands = _sample_range(rng, w.brand_cum, w.brand_start[primary], w.brand_start[primary + 1], 2)
  brands[rng.random(n) < 0.5, 1] = -1
  brands = _pack_left(_drop_repeats(brands))
  # Colors: two liked, one disliked, one to drift to; all distinct.
  cp = _COLOR_WEIGHTS / _COLOR_WEIGHTS.sum()
  # Weighted sampling without replacement: sort exponential arrival times of rate cp.
  colors = np.argsort(-np.log(rng.random((n, len(_COLORS)))) / cp, axis=1)[:, :4]
  drift = (rng.random(n) < p["drift_prob"])
  # Materials: one from the seed family, one from the second liked type's family.
  seed_fam = w.type_fam[seed_type]
  mats = np.full((n, 2), -1, np.int64)
  mats[:, 0] = w.fam_mats[seed_fam, rng.integers(0, 5, n)]
  second_fam = w.type_fam[np.maximum(liked[:, 1], 0)]
  mats[:, 1] = np.where(liked[:, 1] >= 0, w.fam_mats[second_fam, rng.integers(0, 5, n)], -1)
  mats = _pack_left(_drop_repeats(mats))
  dis_mat = w.fam_mats[seed_fam[:, None], rng.integers(0, 5, (n, 4))]
  dis_mat = _pack_left(_drop_repeats(dis_mat, also=mats))[:, 0].copy()
  style = w.dept_styles[primary, rng.integers(0, 5, n)]
  sensitivity = rng.beta(2.0, 2.0, n)

  # Lengths: min_length + overdispersed negative binomial, at least the anchor count.
  extra = max(p["avg_length"] - p["min_length"], 1e-6)
  nb = rng.negative_binomial(0.5, 0.5 / (0.5 + extra), n)
  length = np.minimum(p["min_length"] + nb, p["max_length"])
  length = np.maximum(length, (anchors >= 0).sum(1))
  drift_step = np.where(drift & (length >= 4),
                        2 + (rng.random(n) * np.maximum(length - 2, 1)).astype(np.int64), _MAX_T)
  return _Users(index=index, length=length, liked_types=liked, dis_types=dis, liked_brands=brands,
                liked_colors=colors[:, :2].copy(), drift_step=drift_step,
                drift_color=colors[:, 3].copy(),
                dis_color=colors[:, 2].copy(), liked_mats=mats, dis_mat=dis_mat, liked_style=style,
                sensitivity=sensitivity, primary=primary, secondary=secondary, anchors=anchors)


def _affinity(w: _World, us: _Users, rows: np.ndarray, items: np.ndarray, t: np.ndarray):
  """Affinity (rows, k) of users `rows` for `items` (rows, k) at steps `t`, and match flags."""
  def isin(user_vals, item_vals):  # (m, s), (m, k) -> (m, k)
    return (user_vals[:, :, None] == item_vals[:, None, :]).any(1)

  it, ib = w.item_type[items], w.item_brand[items]
  ic, im = w.item_color[items], w.item_mat[items]
  c0 = np.where(t >= us.drift_step[rows], us.drift_color[rows], us.liked_colors[rows, 0])
  colors = np.stack([c0, us.liked_colors[rows, 1]], 1)
  f_type = isin(us.liked_types[rows], it)
  f_dtype = isin(us.dis_types[rows], it)
  f_brand = isin(us.liked_brands[rows], ib)
  f_color = isin(colors, ic)
  f_dcolor = us.dis_color[rows][:, None] == ic
  f_mat = isin(us.liked_mats[rows], im)
  f_dmat = us.dis_mat[rows][:, None] == im
  f_style = us.liked_style[rows][:, None] == w.item_style[items]
  s = us.sensitivity[rows][:, None]
  tier = w.item_tier[items] / 3.0
  score = (_W_LIKED_TYPE * f_type + _W_DIS_TYPE * f_dtype + _W_BRAND * f_brand + _W_COLOR * f_color
           + _W_DIS_COLOR * f_dcolor + _W_MAT * f_mat + _W_DIS_MAT * f_dmat + _W_STYLE * f_style
           - 1.2 * s * tier + 0.6 * (1.0 - s) * tier)
  flags = (f_type * F_TYPE | f_dtype * F_DIS_TYPE | f_brand * F_BRAND | f_color * F_COLOR
           | f_dcolor * F_DIS_COLOR | f_mat * F_MAT | f_dmat * F_DIS_MAT | f_style * F_STYLE)
  return score, flags.astype(np.int64)


def _simulate(w: _World, us: _Users, rng, p: dict) -> None:
  """Fills us.hist / moves / days / ratings / flags for every user of the chunk."""
  n, lmax = len(us.index), int(us.length.max())
  n_items = len(w.item_leaf)
  k = p["candidates"]
  hist = np.full((n, lmax), -1, np.int64)
  moves = np.zeros((n, lmax), np.int64)
  forced = np.full((n, lmax), -1, np.int64)
  n_anchor = (us.anchors >= 0).sum(1)
  for a in range(us.anchors.shape[1]):
    has = np.nonzero(n_anchor > a)[0]
    pos = (a * us.length[has]) // n_anchor[has]  # spread evenly; the first opens the history
    forced[has, pos] = us.anchors[has, a]
  n_liked = (us.liked_types >= 0).sum(1)
  leaf_lo, leaf_hi = w.leaf_start[:-1], w.leaf_start[1:]
  type_lo, type_hi = w.type_start[:-1], w.type_start[1:]
  fam_lo, fam_hi = w.fam_start[:-1], w.fam_start[1:]
  cum_p = np.cumsum(_MOVE_P)
  dup = 0
  for t in range(lmax):
    act = np.nonzero(us.length > t)[0]
    m = len(act)
    r = rng.random(m)
    move = np.where(t == 0, 5, 1 + np.searchsorted(cum_p, r * cum_p[-1], side="right"))
    move = np.minimum(move, 6)
    prev = hist[act, t - 1] if t > 0 else np.zeros(m, np.int64)
    pleaf, ptype = w.item_leaf[prev], w.item_type[prev]
    liked = us.liked_types[act, (rng.random(m) * n_liked[act]).astype(np.int64)]
    comp = w.comp_types[ptype, rng.integers(0, 2, m)]
    explore_dept = rng.random(m) < 0.5
    udept = us.primary[act]
    lo = np.select([move == 1, move == 2, move == 3, move == 4, move == 5],
                   [leaf_lo[pleaf], type_lo[ptype], fam_lo[w.type_fam[ptype]], type_lo[comp],
                    type_lo[liked]], np.where(explore_dept, w.dept_start[udept], 0))
    hi = np.select([move == 1, move == 2, move == 3, move == 4, move == 5],
                   [leaf_hi[pleaf], type_hi[ptype], fam_hi[w.type_fam[ptype]], type_hi[comp],
                    type_hi[liked]], np.where(explore_dept, w.dept_start[udept + 1], n_items))
    cand = _sample_range(rng, w.pop_cum, lo, hi, k)
    # Two global candidates as an escape hatch when the node is exhausted for this user.
    cand = np.concatenate([cand, _sample_range(rng, w.pop_cum, np.zeros(m, np.int64),
                                               np.full(m, n_items), 2)], axis=1)
    score, _ = _affinity(w, us, act, cand, np.full(m, t))
    score = score / p["temperature"] - np.log(-np.log(rng.random(cand.shape)))
    score[:, k:] -= 8.0
    taken = (hist[act, :t, None] == cand[:, None, :]).any(1)
    taken |= (us.anchors[act][:, :, None] == cand[:, None, :]).any(1)
    score[taken] -= 1e6
    best = np.argmax(score, axis=1)
    choice = cand[np.arange(m), best]
    dup += int(taken[np.arange(m), best].sum())
    f = forced[act, t]
    hist[act, t] = np.where(f >= 0, f, choice)
    moves[act, t] = np.where(f >= 0, 0, move)
  valid = np.arange(lmax)[None, :] < us.length[:, None]
  # Days: a start date, then gaps of >= 1 day, shorter for long histories; ends <= 2018-09-30.
  first, last = 12_784, 17_804  # 2005-01-01 (start floor) .. 2018-09-30
  mean_gap = np.clip(1500.0 / us.length, 2.0, 45.0)
  gaps = rng.geometric(1.0 / mean_gap[:, None], (n, lmax))  # >= 1 day
  gaps = np.where(valid, gaps, 0)
  gaps[:, 0] = 0
  offsets = np.cumsum(gaps, axis=1)
  span = offsets[np.arange(n), us.length - 1]
  start = 15_340 + (rng.random(n) * (17_532 - 15_340)).astype(np.int64)  # 2012-01-01 .. 2018-01-01
  start = np.maximum(np.minimum(start, last - span), first)
  days = start[:, None] + offsets
  # Ratings from the affinity at purchase time plus a quality bonus and noise.
  rows, cols = np.nonzero(valid)
  items = hist[rows, cols]
  score, flags = _affinity(w, us, rows, items[:, None], cols)
  latent = (3.2 + 0.9 * score[:, 0] + 0.25 * w.item_tier[items]
            + rng.normal(0.0, 0.9, len(rows)))
  ratings = np.zeros((n, lmax), np.int64)
  ratings[rows, cols] = np.clip(np.rint(latent), 1, 5).astype(np.int64)
  fl = np.zeros((n, lmax), np.int64)
  fl[rows, cols] = flags[:, 0]
  us.hist, us.moves, us.days, us.ratings, us.flags, us.dup = hist, moves, days, ratings, fl, dup


# ---------------------------------------------------------------------------------------
# Text.

_OPENERS = (
    ("Very disappointed with this {noun}.", "Do not buy this {noun}.", "Complete waste of money.",
     "This {noun} fell apart almost immediately.", "Terrible quality, sadly."),
    ("Not what I hoped for.", "I expected a lot more from this {noun}.", "Disappointing {noun}.",
     "Mediocre at best.", "Not great, not awful, mostly not great."),
    ("It's okay, nothing special.", "Decent {noun}, but not perfect.",
     "Mixed feelings about this one.",
     "Average {noun} for the price.", "It does the job, barely."),
    ("Really nice {noun} overall.", "Very happy with this one.", "Good {noun}, does the job well.",
     "Solid purchase with a few small quibbles.", "Pretty good {noun}."),
    ("Absolutely love this {noun}!", "Exactly what I was looking for.", "Couldn't be happier with it.",
     "This {noun} exceeded my expectations.", "Fantastic {noun}, love it."),
)
_CLOSERS = (
    ("Returned it.", "Save your money.", "Never again."),
    ("Probably returning it.", "Would not buy again.", "Look elsewhere."),
    ("It'll do for now.", "Might keep it.", "Maybe look around first."),
    ("Would recommend.", "Would buy again.", "Happy overall."),
    ("Will buy again!", "Highly recommend.", "Five stars from me."),
)
_SUMMARIES = (
    ("One Star", "Returned it", "Don't buy", "Awful {noun}"),
    ("Two Stars", "Disappointed", "Not great", "Meh {noun}"),
    ("Three Stars", "It's okay", "Average", "Decent {noun}"),
    ("Four Stars", "Very nice", "Good {noun}", "Nice {color} {noun}"),
    ("Five Stars", "Love it!", "Perfect {noun}", "Great {color} {noun}"),
)
_CRIT_TEMPLATES = ("I'd prefer something {x}.", "Show me one {x}.", "Do you have anything {x}?",
                   "Something {x}, please.", "Can I get one {x} instead?")


def _review(w, item: int, rating: int, flags: int, sens: float, r: int) -> tuple[str, str]:
  """(reviewText, summary) that mention what matched or clashed for this user."""
  noun = w.type_nouns[w.item_type[item]]
  color = _COLORS[w.item_color[item]].lower()
  parts = [_OPENERS[rating - 1][r % 5].format(noun=noun)]
  r //= 5
  if flags & F_COLOR:
    parts.append(("Love the {c} color.", "The {c} is exactly my shade.")[r & 1].format(c=color))
  elif flags & F_DIS_COLOR:
    parts.append(("I'm not a fan of the {c}.",
                  "The {c} looks worse in person.")[r & 1].format(c=color))
  r >>= 1
  mat = w.materials[w.item_mat[item]]
  if flags & F_MAT:
    parts.append(("The {m} feels great.", "Nice {m}, good quality.")[r & 1].format(m=mat))
  elif flags & F_DIS_MAT:
    parts.append(("The {m} feels cheap.", "I really don't like {m}.")[r & 1].format(m=mat))
  r >>= 1
  if flags & F_BRAND:
    brand = w.brand_names[w.item_brand[item]]
    parts.append(("{b} never disappoints.", "Another great buy from {b}.")[r & 1].format(b=brand))
  if flags & F_STYLE:
    parts.append(f"Love the {w.styles[w.item_style[item]]} look.")
  if flags & F_DIS_TYPE:
    parts.append(f"Honestly, a {noun} is just not my kind of thing.")
  tier = w.item_tier[item]
  if sens > 0.6:
    parts.append("A bit pricey for what it is." if tier >= 2 else "Great value for the money.")
  elif sens < 0.4:
    parts.append("Worth every penny for the quality." if tier >= 2 else "Feels a bit cheaply made.")
  r >>= 1
  parts.append(_CLOSERS[rating - 1][r % 3])
  r //= 3
  summary = _SUMMARIES[rating - 1][r % 4].format(noun=noun, color=color.capitalize())
  return " ".join(parts), summary


def _critique(w, us, row: int, prev: int, item: int, t: int, r: int) -> str:
  """How the user would ask to get from `prev` to `item` (same leaf), most relevant first."""
  liked_colors = {int(us.liked_colors[row][1]),
                  int(us.drift_color[row] if t >= us.drift_step[row] else us.liked_colors[row][0])}
  sens = us.sensitivity[row]
  cands = []  # (priority, phrase)
  c_prev, c_new = w.item_color[prev], w.item_color[item]
  if c_new != c_prev:
    cands.append((3 if c_new in liked_colors else 1, f"in {_COLORS[c_new].lower()}"))
  p_prev, p_new = w.item_price[prev], w.item_price[item]
  t_prev, t_new = w.item_tier[prev], w.item_tier[item]
  b_prev, b_new = w.item_brand[prev], w.item_brand[item]
  brand = w.brand_names[b_new]
  if t_new > t_prev and b_new != b_prev:
    cands.append((2.5, f"sturdier from {brand}"))
  else:
    if p_new < 0.85 * p_prev:
      cands.append((1 + 2 * sens, "cheaper"))
    elif p_new > 1.15 * p_prev and t_new > t_prev:
      cands.append((2 - sens, "higher quality"))
    if b_new != b_prev:
      cands.append((2.5 if b_new in us.liked_brands[row] else 0.5, f"from {brand}"))
  m_prev, m_new = w.item_mat[prev], w.item_mat[item]
  if m_new != m_prev:
    cands.append((2 if m_new in us.liked_mats[row] else 0.8, f"made of {w.materials[m_new]}"))
  s_prev, s_new = w.item_style[prev], w.item_style[item]
  if s_new != s_prev:
    cands.append((1.5 if s_new == us.liked_style[row] else 0.6, f"with a more {w.styles[s_new]} look"))
  if not cands:
    return "Show me another one just like this."
  cands.sort(key=lambda c: -c[0])
  phrases = [c[1] for c in cands[:2]]
  if len(phrases) == 2 and not phrases[1].startswith(("from", "made", "with")):
    x = f"{phrases[0]} and {phrases[1]}"
  else:
    x = " ".join(phrases)
  return _CRIT_TEMPLATES[r % 5].format(x=x).replace("..", ".")  # brands like "Norvik Co."


def _liked_bits(w, us, row: int, item: int, flags: int) -> list[str]:
  bits = []
  if flags & F_COLOR:
    bits.append(f"{_COLORS[w.item_color[item]].lower()}")
  if flags & F_MAT:
    bits.append(w.materials[w.item_mat[item]])
  if flags & F_STYLE:
    bits.append(f"a {w.styles[w.item_style[item]]} look")
  return bits


def _endorsement(w, us, row: int, item: int, flags: int, r: int) -> str:
  noun = w.type_nouns[w.item_type[item]]
  brand = w.brand_names[w.item_brand[item]]
  bits = _liked_bits(w, us, row, item, flags)
  sens = us.sensitivity[row]
  tier = w.item_tier[item]
  if bits:
    what = " and ".join(bits[:2])
    text = (f"Since you love {what}, this {brand} {noun} is a great fit.",
            f"Made for you: {what} in a {noun} from {brand}.")[r & 1]
  elif flags & F_BRAND:
    text = f"Another {noun} from {brand}, a brand you keep coming back to."
  elif flags & F_TYPE:
    kind = w.type_names[w.item_type[item]].lower()
    text = f"A well-reviewed {noun} for your growing {kind} collection."
  else:
    text = f"Try something new: this {brand} {noun} is a popular pick."
  if sens > 0.6 and tier <= 1:
    text += " And it's easy on the budget."
  elif sens < 0.4 and tier >= 2:
    text += " Its premium build matches your eye for quality."
  return text


def _preferences(w, us, row: int, t: int) -> list[str]:
  """Ground-truth statements true at step t (liked color 0 may have drifted)."""
  out = [f"Likes {w.type_names[x].lower()}" for x in us.liked_types[row] if x >= 0]
  c0 = us.drift_color[row] if t >= us.drift_step[row] else us.liked_colors[row][0]
  out.append(f"Prefers {_COLORS[c0].lower()} or {_COLORS[us.liked_colors[row][1]].lower()} items")
  out += [f"Prefers {w.materials[x]}" for x in us.liked_mats[row] if x >= 0]
  out.append(f"Likes a {w.styles[us.liked_style[row]]} style")
  out += [f"Trusts {w.brand_names[x]}" for x in us.liked_brands[row] if x >= 0]
  sens = us.sensitivity[row]
  if sens > 0.6:
    out.append("Looks for budget-friendly options")
  elif sens < 0.4:
    out.append("Willing to pay more for quality")
  out.append(f"Avoid {_COLORS[us.dis_color[row]].lower()}")
  if us.dis_mat[row] >= 0:
    out.append(f"Avoid {w.materials[us.dis_mat[row]]}")
  out += [f"Avoid {w.type_names[x].lower()}" for x in us.dis_types[row] if x >= 0]
  return out


def _price_word(sens: float) -> str:
  return "budget-conscious" if sens > 0.6 else "quality-focused" if sens < 0.4 else "value-minded"


def _narratives(w, us, row: int, items: list[int], ratings: list[int],
                flags: list[int], days: list[int]) -> dict:
  """REGEN last_purchase / user narratives from the latent state and the kept history."""
  sens = us.sensitivity[row]
  last, lflags = items[-1], flags[-1]
  noun = w.type_nouns[w.item_type[last]]
  reasons = []
  if lflags & F_COLOR:
    reasons.append(f"comes in {_COLORS[w.item_color[last]].lower()}, one of their favorite colors")
  if lflags & F_BRAND:
    reasons.append(f"is from {w.brand_names[w.item_brand[last]]}, a brand they trust")
  if lflags & F_MAT:
    reasons.append(f"is made of {w.materials[w.item_mat[last]]}, which they prefer")
  if lflags & F_TYPE:
    reasons.append(f"fits their interest in {w.type_names[w.item_type[last]].lower()}")
  if not reasons:
    reasons.append("caught their eye while browsing" if len(items) == 1
                   else f"follows their earlier purchase of the {w.titles[items[-2]]}")
  reason = f"They bought the {w.titles[last]} because it " + ", and it ".join(reasons[:2]) + "."
  if len(items) >= 2:
    prev = items[-2]
    if w.item_leaf[prev] == w.item_leaf[last]:
      rel = f"is another {w.leaf_names[w.item_leaf[last]].lower()} item, refining their earlier choice"
    elif w.item_type[prev] == w.item_type[last]:
      rel = f"stays within {w.type_names[w.item_type[last]].lower()}"
    elif w.item_type[last] in w.comp_types[w.item_type[prev]]:
      rel = f"complements the {w.type_nouns[w.item_type[prev]]} they bought before"
    elif w.item_fam[prev] == w.item_fam[last]:
      rel = f"stays in {w.fam_names[w.item_fam[last]]}"
    else:
      rel = f"explores {w.fam_names[w.item_fam[last]]}, a new direction for them"
    explanation = (f"After buying the {w.titles[prev]}, this {noun} {rel}. "
                   f"It suits a {_price_word(sens)} shopper"
                   + (" who likes " + ", ".join(_liked_bits(w, us, row, last, lflags)) + "."
                      if _liked_bits(w, us, row, last, lflags) else "."))
  else:
    explanation = f"Their first purchase here, a {noun}, suits a {_price_word(sens)} shopper."
  liked = [w.type_names[x].lower() for x in us.liked_types[row] if x >= 0]
  c0 = us.drift_color[row] if len(items) - 1 >= us.drift_step[row] else us.liked_colors[row][0]
  colors = f"{_COLORS[c0].lower()} and {_COLORS[us.liked_colors[row][1]].lower()}"
  avoid = [_COLORS[us.dis_color[row]].lower()]
  if us.dis_mat[row] >= 0:
    avoid.append(w.materials[us.dis_mat[row]])
  avoid += [w.type_names[x].lower() for x in us.dis_types[row] if x >= 0]
  brands = [w.brand_names[x] for x in us.liked_brands[row] if x >= 0]
  mats = [w.materials[x] for x in us.liked_mats[row] if x >= 0]
  profile = (f"A {_price_word(sens)} shopper focused on {w.dept_names[us.primary[row]]}, especially "
             f"{', '.join(liked)}. Favors {colors}, {' and '.join(mats)} and a "
             f"{w.styles[us.liked_style[row]]} style; trusts {' and '.join(brands)}. "
             f"Avoids {', '.join(avoid)}.")
  brief = (f"Buys {liked[0]} and related {w.dept_names[us.primary[row]]} items; likes {colors}, "
           f"avoids {avoid[0]}.")
  fams: dict[int, int] = {}
  for i in items:
    fams[int(w.item_fam[i])] = fams.get(int(w.item_fam[i]), 0) + 1
  top = sorted(fams.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
  years = (days[-1] - days[0]) / 365.25
  mean_rating = sum(ratings) / len(ratings)
  long = [f"Over {years:.1f} years this user bought {len(items)} items, mostly in "
          + " and ".join(f"{w.fam_names[f]} ({c})" for f, c in top)
          + f", rating them {mean_rating:.1f} "
          f"stars on average."]
  worst = min(range(len(items)), key=lambda j: (ratings[j], j))
  if ratings[worst] <= 2:
    long.append(f"They were unhappy with the {w.titles[items[worst]]} ({ratings[worst]} stars).")
  best = max(range(len(items)), key=lambda j: (ratings[j], -j))
  if ratings[best] >= 4:
    long.append(f"A favorite was the {w.titles[items[best]]}.")
  long.append(f"They gravitate to {colors}, {' and '.join(mats)}, "
              f"and brands like {', '.join(brands)}, "
              f"and steer clear of {', '.join(avoid)}.")
  if us.drift_step[row] <= len(items) - 1 and us.drift_step[row] < _MAX_T:
    long.append(f"Lately their color taste shifted from {_COLORS[us.liked_colors[row][0]].lower()} "
                f"to {_COLORS[us.drift_color[row]].lower()}.")
  long.append(f"Price-wise they are {_price_word(sens)}.")
  return {"last_purchase": {"reason": reason, "explanation": explanation},
          "user": {"profile": profile, "brief_summary": brief, "long_summary": " ".join(long)}}


# ---------------------------------------------------------------------------------------
# Writing.

def _gzip_writer(path: pathlib.Path, level: int):
  path.parent.mkdir(parents=True, exist_ok=True)
  raw = open(path, "wb")
  return raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level)


def _review_time(day: int) -> str:
  d = np.datetime64(day, "D").item()
  return f"{d.month:02d} {d.day}, {d.year}"


def _anchor_table(num_users: int, num_items: int, copies: int, rng) -> tuple[np.ndarray, int]:
  """Per user rank (a random permutation) and the max anchors per user."""
  rank = rng.permutation(num_users)
  per_user = -(-copies * num_items // num_users) if copies else 0
  return rank, per_user


def _anchors_for(rank: np.ndarray, num_users: int, num_items: int, copies: int, width: int):
  """Items forced into each user's history: slots dealt in catalog order by rank block."""
  n = len(rank)
  out = np.full((n, max(width, 1)), -1, np.int64)
  if copies == 0:
    return out
  slots = copies * num_items
  lo = (rank * slots) // num_users
  hi = ((rank + 1) * slots) // num_users
  for a in range(width):
    has = lo + a < hi
    out[has, a] = (lo[has] + a) % num_items  # consecutive slots: distinct items per user
  return out


def write_synthetic(output_dir: str | os.PathLike, *, num_users: int, num_items: int, seed: int = 0,
                    formats: Sequence[str] = FORMATS, avg_length: float | None = None,
                    min_length: int = 5, max_length: int = 500, min_item_interactions: int = 5,
                    popularity_sigma: float = 1.5, regen_max_history: int = 50,
                    chunk_size: int = 10_000, compresslevel: int = 6,
                    tree_shape: Sequence[int] | None = None) -> dict[str, Any]:
  """Writes the synthetic dataset under output_dir and returns its summary.

  Args:
    output_dir: created if missing; existing files of the same names are overwritten.
    num_users, num_items: world size (num_items >= 10).
    seed: everything is a deterministic function of the arguments.
    formats: any of "amazon2018", "regen"; truth/ and synthetic.json are always written.
    avg_length: mean history length (default 9.0); lengths are min_length + a negative
      binomial (dispersion 0.5), capped at max_length.
    min_item_interactions: anchors per item (see module doc); lowered when the users
      cannot fund it, the value used is summary["world"]["anchors_per_item"].
    popularity_sigma: log-normal spread of item popularity (larger: heavier head).
    regen_max_history: REGEN keeps each user's most recent N purchases.
    chunk_size: users simulated and written at a time (output depends on it).
    compresslevel: gzip level of every file.
    tree_shape: (departments, families, types, subtypes), each within (8, 5, 5, 4);
      default grows with num_items.

  Returns:
    The summary also written to output_dir/synthetic.json: num_users, num_items,
    num_interactions, files (relative paths), counts, world and params.
  """
  formats = tuple(dict.fromkeys(formats))
  unknown = [f for f in formats if f not in FORMATS]
  if unknown:
    raise ValueError(f"unknown synthetic formats {unknown}; choose from {list(FORMATS)}")
  if num_items < 10 or num_users < 1:
    raise ValueError(f"need num_items >= 10 and num_users >= 1, got {num_items}, {num_users}")
  avg_length = 9.0 if avg_length is None else float(avg_length)
  if not 1 <= min_length <= avg_length <= max_length:
    raise ValueError(f"need 1 <= min_length ({min_length}) <= avg_length ({avg_length}) <= "
                     f"max_length ({max_length})")
  shape = tuple(int(s) for s in tree_shape) if tree_shape else _shape_for(num_items)
  if len(shape) != 4 or not all(1 <= s <= m for s, m in zip(shape, _MAX_SHAPE)):
    raise ValueError(f"tree_shape {shape} must have 4 levels within {_MAX_SHAPE}")
  if num_items < 2 * int(np.prod(shape)):
    raise ValueError(f"tree_shape {shape} needs num_items >= {2 * int(np.prod(shape))}")

  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  p = {"avg_length": avg_length, "min_length": int(min_length), "max_length": int(max_length),
       "candidates": 5, "temperature": 0.7, "drift_prob": 0.25}
  w = _build_world(num_items, seed, shape, popularity_sigma)
  # Anchor copies per item: what the users can fund without anchors dominating histories.
  copies = int(min(min_item_interactions, (num_users * min_length) // num_items,
                   (num_users * avg_length) // (2 * num_items)))
  copies = max(copies, 0)
  rank, width = _anchor_table(num_users, num_items, copies, np.random.default_rng([seed, 2]))

  files: dict[str, str] = {}
  writers = {}
  if "amazon2018" in formats:
    files["amazon2018_reviews"] = "amazon2018/Synthetic.json.gz"
    files["amazon2018_meta"] = "amazon2018/meta_Synthetic.json.gz"
    _write_meta(w, out / files["amazon2018_meta"], compresslevel)
    writers["amazon2018"] = _gzip_writer(out / files["amazon2018_reviews"], compresslevel)
  if "regen" in formats:
    files["regen"] = "regen/synthetic.jsonl.gz"
    writers["regen"] = _gzip_writer(out / files["regen"], compresslevel)
  files["truth_users"] = "truth/users.jsonl.gz"
  files["truth_items"] = "truth/items.jsonl.gz"
  files["truth_world"] = "truth/world.json"
  writers["truth"] = _gzip_writer(out / files["truth_users"], compresslevel)
  _write_truth_items(w, out / files["truth_items"], compresslevel)
  _write_world(w, out / files["truth_world"])

  counts = {"interactions": 0, "regen_entries": 0, "regen_users_truncated": 0, "critiques": 0,
            "repeat_purchases": 0, "max_length": 0}
  rating_hist = [0] * 5
  item_counts = np.zeros(num_items, np.int64)
  date_cache: dict[int, str] = {}
  item_cache: dict[int, dict] = {}  # REGEN item objects, shared by every line that cites them
  wl = _as_lists(w)
  try:
    for c, lo in enumerate(range(0, num_users, chunk_size)):
      hi = min(lo + chunk_size, num_users)
      rng = np.random.default_rng([seed, 1, c])
      index = np.arange(lo, hi)
      anchors = _anchors_for(rank[lo:hi], num_users, num_items, copies, width)
      us = _make_users(w, rng, index, anchors, p)
      _simulate(w, us, rng, p)
      item_counts += np.bincount(us.hist[us.hist >= 0], minlength=num_items)
      counts["interactions"] += int(us.length.sum())
      counts["repeat_purchases"] += us.dup
      counts["max_length"] = max(counts["max_length"], int(us.length.max()))
      for k in range(5):
        rating_hist[k] += int(((us.ratings == k + 1)).sum())
      _write_chunk(wl, us, rng, seed, writers, regen_max_history, date_cache, item_cache, counts)
  finally:
    for raw, gz in writers.values():
      gz.close()
      raw.close()

  covered = item_counts[item_counts > 0]
  summary = {
      "generator": "recjax.data.synthetic", "version": VERSION,
      "num_users": num_users, "num_items": num_items, "num_interactions": counts["interactions"],
      "files": files,
      "counts": {**counts, "ratings": {str(k + 1): rating_hist[k] for k in range(5)},
                 "items_with_interactions": int(len(covered)),
                 "min_item_interactions": int(item_counts.min()),
                 "mean_length": round(counts["interactions"] / num_users, 4)},
      "world": {"tree_shape": list(shape), "departments": len(w.dept_names),
                "families": len(w.fam_names), "types": len(w.type_names),
                "leaves": len(w.leaf_names), "brands": len(w.brand_names),
                "anchors_per_item": copies, "max_anchors_per_user": width},
      "params": {"seed": seed, "formats": list(formats), "avg_length": avg_length,
                 "min_length": min_length, "max_length": max_length,
                 "min_item_interactions": min_item_interactions,
                 "popularity_sigma": popularity_sigma, "regen_max_history": regen_max_history,
                 "chunk_size": chunk_size, "compresslevel": compresslevel},
  }
  (out / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _write_meta(w: _World, path: pathlib.Path, level: int) -> None:
  raw, gz = _gzip_writer(path, level)
  try:
    lines = []
    for i in sorted(range(len(w.asins)), key=w.asins.__getitem__):
      lines.append(json.dumps({
          "asin": w.asins[i], "title": w.titles[i], "brand": w.brand_names[w.item_brand[i]],
          "category": list(w.leaf_paths[w.item_leaf[i]]), "description": w.descriptions[i],
          "price": w.prices[i], "main_cat": w.dept_names[w.item_dept[i]]}))
      if len(lines) >= 20_000:
        gz.write(("\n".join(lines) + "\n").encode())
        lines = []
    if lines:
      gz.write(("\n".join(lines) + "\n").encode())
  finally:
    gz.close()
    raw.close()


def _write_truth_items(w: _World, path: pathlib.Path, level: int) -> None:
  raw, gz = _gzip_writer(path, level)
  try:
    lines = []
    pop_rank = np.argsort(np.argsort(-w.item_pop, kind="stable"), kind="stable")
    for i in range(len(w.asins)):
      lines.append(json.dumps({
          "asin": w.asins[i], "category": list(w.leaf_paths[w.item_leaf[i]]),
          "brand": w.brand_names[w.item_brand[i]], "color": _COLORS[w.item_color[i]],
          "material": w.materials[w.item_mat[i]], "style": w.styles[w.item_style[i]],
          "tier": _TIERS[w.item_tier[i]], "price": float(w.item_price[i]),
          "popularity_rank": int(pop_rank[i])}))
      if len(lines) >= 20_000:
        gz.write(("\n".join(lines) + "\n").encode())
        lines = []
    if lines:
      gz.write(("\n".join(lines) + "\n").encode())
  finally:
    gz.close()
    raw.close()


def _write_world(w: _World, path: pathlib.Path) -> None:
  tree: dict = {}
  for path4 in w.leaf_paths:
    tree.setdefault(path4[0], {}).setdefault(path4[1], {}).setdefault(path4[2], []).append(path4[3])
  comp = {" - ".join(w.type_paths[t]): [" - ".join(w.type_paths[c]) for c in cs]
          for t, cs in enumerate(w.comp_types.tolist())}
  path.write_text(json.dumps({"tree": tree, "complementary_types": comp,
                              "colors": list(_COLORS), "tiers": list(_TIERS)}, indent=1) + "\n")


def _as_lists(obj, skip: Sequence[str] = ()) -> types.SimpleNamespace:
  """The same fields with arrays as nested lists: per-row Python access is much faster."""
  return types.SimpleNamespace(**{f.name: (v.tolist() if isinstance(v, np.ndarray) else v)
                                  for f in dataclasses.fields(obj) if f.name not in skip
                                  for v in [getattr(obj, f.name)]})


def _write_chunk(w, us: _Users, rng, seed: int, writers: dict, regen_max: int,
                 date_cache: dict, item_cache: dict, counts: dict) -> None:
  """Writes one chunk's lines; `w` is the world as lists (`_as_lists`)."""
  n = len(us.index)
  valid = np.arange(us.hist.shape[1])[None, :] < us.length[:, None]
  total = int(us.length.sum())
  # Flat per-interaction values in (user, step) order; rows start at offsets[row].
  hist, days, ratings = us.hist[valid].tolist(), us.days[valid].tolist(), us.ratings[valid].tolist()
  flags, moves = us.flags[valid].tolist(), us.moves[valid].tolist()
  rand = rng.integers(0, 1 << 62, total).tolist()  # template choices: bits 0-19 / 20-39 / 40-61
  verified = (rng.random(total) < 0.87).tolist()
  names = rng.integers(0, len(_FIRST_NAMES) * 26 * 12, n).tolist()
  meta = rng.integers(3, 6, (n, 12)).tolist()
  offsets = np.concatenate([[0], np.cumsum(us.length)]).tolist()
  lengths = us.length.tolist()
  us = _as_lists(us, skip=("hist", "moves", "days", "ratings", "flags"))
  sens = us.sensitivity
  amazon = "amazon2018" in writers
  regen = "regen" in writers
  a_lines, r_lines, t_lines = [], [], []
  for row in range(n):
    uid = _reviewer_id(us.index[row], seed)
    name_code = names[row]
    if name_code % 12 == 0:
      name = "Amazon Customer"
    else:
      name = f"{_FIRST_NAMES[name_code // (26 * 12)]} {chr(65 + (name_code // 12) % 26)}."
    qname = _quote(name)
    o, length = offsets[row], lengths[row]
    items, rts = hist[o:o + length], ratings[o:o + length]
    rds, fls, rnd = days[o:o + length], flags[o:o + length], rand[o:o + length]
    texts = [_review(w, items[j], rts[j], fls[j], sens[row], rnd[j] & 0xFFFFF) for j in range(length)]
    if amazon:
      for j in range(length):
        day = rds[j]
        rt = date_cache.get(day)
        if rt is None:
          rt = date_cache[day] = _review_time(day)
        # Hand-assembled: the same bytes as json.dumps of the dict, about 3x faster.
        a_lines.append(
            f'{{"overall": {rts[j]}.0, "verified": {"true" if verified[o + j] else "false"}, '
            f'"reviewTime": "{rt}", "reviewerID": "{uid}", "asin": "{w.asins[items[j]]}", '
            f'"reviewerName": {qname}, "reviewText": {_quote(texts[j][0])}, '
            f'"summary": {_quote(texts[j][1])}, "unixReviewTime": {day * 86_400}}}')
    if regen:
      start = max(0, length - regen_max)
      counts["regen_entries"] += length - start
      counts["regen_users_truncated"] += start > 0
      entries = []
      for j in range(start, length):
        it = items[j]
        item = item_cache.get(it)
        if item is None:
          item = item_cache[it] = {
              "asin": w.asins[it], "title": w.titles[it],
              "category": " - ".join(w.leaf_paths[w.item_leaf[it]]),
              "description": " ".join(w.descriptions[it]), "price": w.prices[it]}
        critique = None  # the first kept entry has no visible predecessor
        if j > start and w.item_leaf[items[j - 1]] == w.item_leaf[it]:
          critique = _critique(w, us, row, items[j - 1], it, j, (rnd[j] >> 20) & 0xFFFFF)
          counts["critiques"] += 1
        entries.append({
            "item": item,
            "review": {"summary": texts[j][1], "rating": float(rts[j]), "text": texts[j][0],
                       "unix_time": rds[j] * 86_400},
            "critique": critique,
            "endorsement": _endorsement(w, us, row, it, fls[j], rnd[j] >> 40),
            "preferences": _preferences(w, us, row, j)})
      kept = slice(start, length)
      narr = _narratives(w, us, row, items[kept], rts[kept], fls[kept], rds[kept])
      m = meta[row]
      richness = min(5, 1 + (length - start) // 10)
      r_lines.append(json.dumps({
          "reviewer_id": uid, "purchase_history": entries, **narr,
          "metadata": {"example": {"richness": richness, "confidence": m[0]},
                       "last_purchase": {"veracity": m[1], "grounding": m[2], "foresight": m[3],
                                         "clarity": m[4], "personalization": m[5],
                                         "confidence": m[6]},
                       "user": {"veracity": m[7], "grounding": m[8], "clarity": m[9],
                                "personalization": m[10], "confidence": m[11]}}}))
    t_lines.append(json.dumps(_truth_user(w, us, row, uid, items, moves[o:o + length])))
  if amazon:
    writers["amazon2018"][1].write(("\n".join(a_lines) + "\n").encode())
  if regen:
    writers["regen"][1].write(("\n".join(r_lines) + "\n").encode())
  writers["truth"][1].write(("\n".join(t_lines) + "\n").encode())


def _truth_user(w, us, row: int, uid: str, items: list[int], moves: list[int]) -> dict:
  drift = None
  if us.drift_step[row] < len(items):
    drift = {"step": int(us.drift_step[row]), "from": _COLORS[us.liked_colors[row][0]],
             "to": _COLORS[us.drift_color[row]]}
  sec = us.secondary[row]
  return {
      "reviewer_id": uid, "index": us.index[row],
      "primary_department": w.dept_names[us.primary[row]],
      "secondary_department": w.dept_names[sec] if sec >= 0 else None,
      "liked_categories": [list(w.type_paths[t]) for t in us.liked_types[row] if t >= 0],
      "disliked_categories": [list(w.type_paths[t]) for t in us.dis_types[row] if t >= 0],
      "liked_brands": [w.brand_names[b] for b in us.liked_brands[row] if b >= 0],
      "liked_colors": [_COLORS[c] for c in us.liked_colors[row]],
      "color_drift": drift,
      "disliked_colors": [_COLORS[us.dis_color[row]]],
      "liked_materials": [w.materials[m] for m in us.liked_mats[row] if m >= 0],
      "disliked_materials": [w.materials[us.dis_mat[row]]] if us.dis_mat[row] >= 0 else [],
      "liked_styles": [w.styles[us.liked_style[row]]],
      "price_sensitivity": round(us.sensitivity[row], 4),
      "anchors": [w.asins[a] for a in us.anchors[row] if a >= 0],
      "moves": [_STEP_MOVES[m] for m in moves],
      "history": [w.asins[i] for i in items],
  }


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("output_dir")
  ap.add_argument("--num_users", type=int, required=True)
  ap.add_argument("--num_items", type=int, required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--formats", default=",".join(FORMATS))
  ap.add_argument("--avg_length", type=float, default=None)
  ap.add_argument("--chunk_size", type=int, default=10_000)
  args = ap.parse_args(argv)
  start = time.time()
  summary = write_synthetic(args.output_dir, num_users=args.num_users, num_items=args.num_items,
                            seed=args.seed, formats=tuple(f for f in args.formats.split(",") if f),
                            avg_length=args.avg_length, chunk_size=args.chunk_size)
  print(json.dumps({k: summary[k] for k in ("num_users", "num_items", "num_interactions")})
        + f" in {time.time() - start:.1f}s")


if __name__ == "__main__":
  main()
