"""The knowledge table of the synthetic world: every object kind with its category, attributes,
typical uses and facts.

Each kind is one colour emoji (rendered from Noto Color Emoji). Uses and facts are ids into
:data:`PROPERTIES`; a property is a predicate the reasoning queries ask about ("what here could cut
paper?") and carries the sentence that explains an answer ("The scissors can cut paper."). Because the
world is generated from this table, a property query's targets are exactly the objects in the scene
whose kind lists the property.

Table syntax, one kind per line::

    emoji | name | category | colour | attributes | uses | facts

``name`` may end in ``+`` to mark a plural noun ("scissors+"); attributes, uses and facts are comma
separated; ``-`` means none. The colour column is the colour word that covers at least half of the glyph
as Noto draws it (measured with :func:`reasonseg.data.synth.render.dominant_colour`, then a few
misleading ones, e.g. the banana's orange shading, blanked by hand); ``-`` marks a mixed-colour object,
never used in colour queries. Edible kinds also get the category use "can be eaten"/"can be drunk".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
)


@dataclass(frozen=True)
class Category:
    """A category: ``singular`` ("a fruit" uses it), ``plural`` ("all the fruit")."""

    id: str
    singular: str
    plural: str


@dataclass(frozen=True)
class Property:
    """A use or fact. ``clause`` is a third-person singular verb phrase ("can cut paper", "is rich in
    vitamin C"); ``plural_clause`` the same for a plural subject."""

    id: str
    kind: str  # "use" or "fact"
    clause: str
    plural_clause: str

    def explain(self, subject: str, plural: bool) -> str:
        """'The orange is rich in vitamin C.' / 'The grapes are ...'."""
        text = f"{subject} {self.plural_clause if plural else self.clause}."
        return text[0].upper() + text[1:]


@dataclass(frozen=True)
class Kind:
    """One object kind of the world."""

    emoji: str
    name: str
    plural: bool  # the name is a plural noun ("scissors", "grapes")
    category: str
    colour: str | None  # dominant colour as drawn, or None when mixed
    attributes: tuple[str, ...]
    uses: tuple[str, ...]
    facts: tuple[str, ...]

    @property
    def properties(self) -> tuple[str, ...]:
        return self.uses + self.facts

    @property
    def the(self) -> str:
        return f"the {self.name}"


CATEGORIES: dict[str, Category] = {
    c.id: c
    for c in (
        Category("fruit", "fruit", "fruit"),
        Category("vegetable", "vegetable", "vegetables"),
        Category("food", "dish", "dishes"),
        Category("sweet", "sweet", "sweets"),
        Category("drink", "drink", "drinks"),
        Category("mammal", "mammal", "mammals"),
        Category("bird", "bird", "birds"),
        Category("sea", "sea creature", "sea creatures"),
        Category("small", "small creature", "small creatures"),
        Category("plant", "plant", "plants"),
        Category("vehicle", "vehicle", "vehicles"),
        Category("tool", "tool", "tools"),
        Category("kitchen", "piece of kitchenware", "kitchenware"),
        Category("instrument", "musical instrument", "musical instruments"),
        Category("sport", "piece of sports gear", "sports gear"),
        Category("clothing", "piece of clothing", "clothes"),
        Category("device", "electronic device", "electronic devices"),
        Category("stationery", "piece of stationery", "stationery"),
        Category("household", "household item", "household items"),
        Category("toy", "toy", "toys"),
    )
}


_AGREEMENT = {  # marker -> (singular subject, plural subject)
    "{is}": ("is", "are"),
    "{has}": ("has", "have"),
    "{ies}": ("ies", "y"),  # carr{ies}: carries / carry
    "{es}": ("es", ""),
    "{s}": ("s", ""),
}


def _p(pid: str, kind: str, clause: str) -> Property:
    """Build a property; ``{s}``/``{es}``/``{ies}``/``{is}``/``{has}`` mark verb agreement."""
    sg, pl = clause, clause
    for marker, (one, many) in _AGREEMENT.items():
        sg, pl = sg.replace(marker, one), pl.replace(marker, many)
    if "{" in sg or "}" in sg:
        raise ValueError(f"property {pid!r}: unknown agreement marker in {clause!r}")
    return Property(pid, kind, sg, pl)


PROPERTIES: dict[str, Property] = {
    p.id: p
    for p in (
        # typical uses
        _p("cut", "use", "can cut paper"),
        _p("chop_wood", "use", "can chop wood"),
        _p("drive_nail", "use", "can drive a nail into a board"),
        _p("turn_bolt", "use", "can tighten a bolt or a screw"),
        _p("dig", "use", "can break up hard ground"),
        _p("tell_time", "use", "tell{s} the time"),
        _p("rain", "use", "keep{s} you dry in the rain"),
        _p("music", "use", "can be played to make music"),
        _p("write", "use", "can write or draw on paper"),
        _p("measure", "use", "can measure the length of a line"),
        _p("light", "use", "can light up a dark room"),
        _p("unlock", "use", "can open a locked door"),
        _p("sweep", "use", "can sweep the floor"),
        _p("wash", "use", "help{s} you wash and clean things"),
        _p("warm", "use", "keep{s} you warm in winter"),
        _p("sun_eyes", "use", "protect{s} your eyes from bright sun"),
        _p("feet", "use", "{is} worn on the feet"),
        _p("head", "use", "{is} worn on the head"),
        _p("kick", "use", "{is} kicked in a ball game"),
        _p("racket", "use", "{is} hit with a racket or paddle"),
        _p("emergency", "use", "rush{es} to help in an emergency"),
        _p("public", "use", "carr{ies} many passengers on a fixed route"),
        _p("fly_vehicle", "use", "can carry people through the air"),
        _p("water_vehicle", "use", "travel{s} on water"),
        _p("pedal", "use", "{is} moved by the rider's own legs"),
        _p("brew_tea", "use", "{is} used to brew tea"),
        _p("eat_with", "use", "{is} used to bring food to your mouth"),
        _p("cook", "use", "{is} used to cook food on a stove"),
        _p("photo", "use", "can take photos"),
        _p("call", "use", "can make phone calls"),
        _p("type", "use", "{is} used to type text into a computer"),
        _p("play_games", "use", "{is} used to play video games"),
        _p("carry_things", "use", "{is} used to carry or store things"),
        _p("sit", "use", "{is} made for sitting on"),
        _p("sleep", "use", "{is} made for sleeping in"),
        _p("teeth", "use", "clean{s} your teeth"),
        _p("shave", "use", "{is} used for shaving"),
        _p("stars", "use", "help{s} you look at distant stars"),
        _p("tiny", "use", "make{s} tiny cells visible"),
        _p("iron", "use", "can pick up iron nails"),
        _p("fire_out", "use", "put{s} out fires"),
        _p("reach_high", "use", "help{s} you reach a high shelf"),
        _p("hold_paper", "use", "hold{s} sheets of paper together"),
        _p("award", "use", "{is} given to a winner"),
        _p("pay", "use", "can pay for things"),
        _p("find_way", "use", "help{s} you find your way"),
        _p("paint", "use", "{is} used for painting pictures"),
        _p("read", "use", "can be read"),
        _p("mail", "use", "{is} sent by post"),
        _p("count", "use", "help{s} you count and do sums"),
        _p("cuddle", "use", "{is} a soft toy to cuddle"),
        _p("board_game", "use", "{is} used in board games"),
        _p("party", "use", "{is} typical at a birthday party"),
        _p("fishing", "use", "{is} used to catch fish"),
        _p("amplify", "use", "make{s} a voice louder"),
        _p("ring", "use", "ring{s} to call attention"),
        _p("eat", "use", "can be eaten"),
        _p("cue", "use", "{is} struck with a cue"),
        _p("drink", "use", "can be drunk"),
        _p("make_wine", "use", "{is} used to make wine"),
        _p("season", "use", "{is} used to season food"),
        _p("hoop", "use", "{is} thrown through a hoop"),
        _p("bat_hit", "use", "{is} hit with a bat"),
        _p("net", "use", "{is} hit over a high net"),
        _p("punch", "use", "{is} worn to punch in a sport"),
        _p("glide", "use", "glide{s} through the air when thrown"),
        _p("wear_body", "use", "{is} worn on the body"),
        _p("skin", "use", "{is} used to care for the skin"),
        _p("hold_boat", "use", "keep{s} a boat in place"),
        _p("string_toy", "use", "{is} a toy that runs up and down a string"),
        _p("fit_together", "use", "fit{s} together with others to make a picture"),
        _p("decorate", "use", "decorate{s} a room"),
        # facts
        _p("water_rich", "fact", "{is} mostly water"),
        _p("bush", "fact", "grow{s} on a bush"),
        _p("ketchup", "fact", "{is} the main ingredient of ketchup"),
        _p("aubergine", "fact", "{is} also called an aubergine"),
        _p("salad", "fact", "{is} often eaten in salads"),
        _p("fungus", "fact", "{is} a fungus, not a plant"),
        _p("fast_food", "fact", "{is} a typical fast food"),
        _p("china", "fact", "{is} a traditional food from China"),
        _p("chopstick_food", "fact", "{is} usually eaten with chopsticks"),
        _p("horn", "fact", "{has} a horn on its nose"),
        _p("cheeks", "fact", "store{s} nuts in its cheeks"),
        _p("big_cat", "fact", "{is} a big wild cat"),
        _p("slow", "fact", "{is} famous for moving slowly"),
        _p("tail_fan", "fact", "{has} a showy fan of tail feathers"),
        _p("colony", "fact", "live{s} in large colonies"),
        _p("metamorphosis", "fact", "turn{s} into a butterfly"),
        _p("slither", "fact", "move{s} by slithering"),
        _p("luck", "fact", "{is} a symbol of good luck"),
        _p("canada", "fact", "{is} a symbol of Canada"),
        _p("bathroom", "fact", "belong{s} in a bathroom"),
        _p("precious", "fact", "{is} precious and valuable"),
        _p("on_tree", "fact", "grow{s} on a tree"),
        _p("bread", "fact", "{is} a kind of bread"),
        _p("corn", "fact", "{is} made of corn"),
        _p("syrup", "fact", "{is} often eaten with maple syrup"),
        _p("lunch", "fact", "{is} a typical packed lunch"),
        _p("vitamin_c", "fact", "{is} rich in vitamin C"),
        _p("potassium", "fact", "{is} famous for its potassium"),
        _p("underground", "fact", "grow{s} under the ground"),
        _p("sour", "fact", "taste{s} very sour"),
        _p("spicy", "fact", "taste{s} hot and spicy"),
        _p("sugary", "fact", "{is} full of sugar"),
        _p("caffeine", "fact", "contain{s} caffeine"),
        _p("alcohol", "fact", "contain{s} alcohol"),
        _p("dairy", "fact", "{is} made from milk"),
        _p("bees", "fact", "{is} made by bees"),
        _p("baby", "fact", "{is} made for feeding a baby"),
        _p("fried", "fact", "{is} usually deep-fried"),
        _p("italy", "fact", "{is} a famous dish from Italy"),
        _p("japan", "fact", "{is} a traditional food from Japan"),
        _p("mexico", "fact", "{is} a traditional food from Mexico"),
        _p("flies", "fact", "can fly"),
        _p("swims", "fact", "live{s} in water"),
        _p("farm", "fact", "{is} kept on farms"),
        _p("milk_animal", "fact", "give{s} milk that people drink"),
        _p("wool", "fact", "{has} wool that is made into yarn"),
        _p("stripes", "fact", "{has} a striped coat"),
        _p("long_neck", "fact", "{has} a very long neck"),
        _p("trunk", "fact", "{is} the largest land animal and has a trunk"),
        _p("hops", "fact", "move{s} by hopping"),
        _p("shell", "fact", "carr{ies} a hard shell"),
        _p("desert", "fact", "can live in a dry desert"),
        _p("polar", "fact", "live{s} in icy polar lands"),
        _p("night", "fact", "{is} active at night"),
        _p("eight_legs", "fact", "{has} eight legs or arms"),
        _p("sting", "fact", "can sting"),
        _p("pollinate", "fact", "carr{ies} pollen between flowers"),
        _p("thorns", "fact", "{is} covered in sharp spines or thorns"),
        _p("pet", "fact", "{is} a common pet"),
        _p("primate", "fact", "{is} a primate"),
        _p("pouch", "fact", "carr{ies} its young in a pouch"),
        _p("cold", "fact", "{is} freezing cold"),
        _p("electric", "fact", "run{s} on electricity"),
        _p("wheels", "fact", "roll{s} on wheels"),
        _p("sharp", "fact", "{has} a sharp edge or point"),
        _p("glass", "fact", "{is} made of glass"),
        _p("wood", "fact", "{is} made mostly of wood"),
        _p("christmas", "fact", "{is} a symbol of Christmas"),
        _p("halloween", "fact", "{is} a symbol of Halloween"),
        _p("strings", "fact", "{has} strings"),
        _p("blow", "fact", "{is} played by blowing into it"),
        _p("hit", "fact", "{is} played by hitting it"),
        _p("tree", "fact", "{is} a tree"),
        _p("flower", "fact", "{is} a flower"),
        _p("seeds_outside", "fact", "{has} its seeds on the outside"),
        _p("tropical", "fact", "grow{s} in hot tropical places"),
        _p("protein", "fact", "{is} rich in protein"),
    )
}

# emoji | name | category | colour | attributes | uses | facts
_TABLE = """
🍎|apple|fruit|red|round,sweet,crunchy|-|on_tree
🍏|green apple|fruit|green|round,crunchy|-|on_tree,sour
🍐|pear|fruit|yellow|sweet,juicy|-|on_tree
🍊|orange|fruit|orange|round,juicy|-|vitamin_c,on_tree
🍋|lemon|fruit|yellow|oval,juicy|-|vitamin_c,sour,on_tree
🍌|banana|fruit|-|curved,soft|-|potassium,tropical
🍉|watermelon|fruit|red|large,juicy|-|water_rich
🍇|grapes+|fruit|purple|small,round|make_wine|-
🍓|strawberry|fruit|red|small,sweet|-|vitamin_c,seeds_outside
🫐|blueberries+|fruit|blue|small,round|-|bush
🍒|cherries+|fruit|red|small,round|-|on_tree
🍑|peach|fruit|red|round,fuzzy|-|on_tree
🥭|mango|fruit|orange|sweet,juicy|-|vitamin_c,tropical,on_tree
🍍|pineapple|fruit|-|spiky,sweet|-|vitamin_c,tropical
🥥|coconut|fruit|-|hard,hairy|-|tropical,on_tree
🥝|kiwi|fruit|-|fuzzy,small|-|vitamin_c
🍅|tomato|vegetable|red|round,juicy|-|ketchup,salad
🍆|eggplant|vegetable|purple|long,smooth|-|aubergine
🥑|avocado|vegetable|-|creamy|-|potassium,on_tree
🥦|broccoli|vegetable|green|leafy|-|vitamin_c
🥬|lettuce|vegetable|green|leafy|-|salad
🥒|cucumber|vegetable|green|long,crisp|-|water_rich,salad
🌶️|chili pepper|vegetable|red|long,hot|-|spicy,vitamin_c
🫑|bell pepper|vegetable|green|crisp|-|vitamin_c
🌽|corn|vegetable|-|long|-|corn
🥕|carrot|vegetable|-|long,crunchy|-|underground
🧄|garlic|vegetable|white|pungent|-|underground
🧅|onion|vegetable|orange|round,pungent|-|underground
🥔|potato|vegetable|orange|starchy|-|underground,potassium
🍄|mushroom|vegetable|red|spotted|-|fungus
🥜|peanuts+|vegetable|orange|small|-|underground,protein
🫛|pea pod|vegetable|green|long|-|protein
🍞|bread|food|orange|soft|-|bread
🥐|croissant|food|orange|flaky,curved|-|bread
🥖|baguette|food|orange|long,crusty|-|bread
🥨|pretzel|food|orange|twisted,salty|-|bread
🥯|bagel|food|-|round,chewy|-|bread
🥞|pancakes+|food|orange|stacked,soft|-|syrup
🧇|waffle|food|orange|square,crisp|-|syrup
🧀|cheese|food|yellow|wedge|-|dairy,protein
🍖|meat on the bone|food|orange|roasted|-|protein
🍗|chicken leg|food|red|roasted|-|protein,fried
🥩|steak|food|red|raw|-|protein
🥓|bacon|food|red|strips|-|protein
🍔|hamburger|food|orange|stacked|-|fast_food
🍟|french fries+|food|-|salty|-|fried,fast_food
🍕|pizza slice|food|orange|triangular,cheesy|-|italy
🌭|hot dog|food|orange|long|-|fast_food
🥪|sandwich|food|orange|stacked|-|lunch
🌮|taco|food|yellow|folded|-|mexico
🌯|burrito|food|-|wrapped|-|mexico
🥚|egg|food|-|oval,smooth|-|protein
🍳|frying pan with an egg|kitchen|-|round,hot|cook|-
🍿|popcorn|food|-|crunchy,salty|-|corn
🍣|sushi|food|-|small|-|japan,chopstick_food
🍙|rice ball|food|white|triangular|-|japan
🥟|dumpling|food|-|folded|-|china
🍜|noodle bowl|food|-|steaming,hot|-|chopstick_food
🍩|doughnut|sweet|brown|round,glazed|-|sugary,fried
🍪|cookie|sweet|orange|round,crunchy|-|sugary
🎂|birthday cake|sweet|orange|layered|party|sugary
🍰|slice of cake|sweet|-|creamy|-|sugary
🧁|cupcake|sweet|-|frosted|party|sugary
🍫|chocolate bar|sweet|-|rectangular|-|sugary
🍬|candy|sweet|-|wrapped|-|sugary
🍭|lollipop|sweet|-|swirled|-|sugary
🍯|honey pot|sweet|orange|sticky|-|bees,sugary
🍦|ice cream cone|sweet|-|soft,swirled|-|dairy,cold,sugary
☕|cup of coffee|drink|white|hot,steaming|-|caffeine
🍵|cup of green tea|drink|white|hot|-|caffeine
🥛|glass of milk|drink|-|cold|-|dairy,glass
🍼|baby bottle|drink|white|plastic|-|baby
🧃|juice box|drink|green|rectangular|-|sugary
🥤|cup with a straw|drink|blue|cold|-|sugary
🍷|glass of wine|drink|-|elegant|-|alcohol,glass
🍺|mug of beer|drink|-|foamy|-|alcohol,glass
🧋|bubble tea|drink|-|sweet|-|caffeine,sugary
🐕|dog|mammal|orange|furry,loyal|-|pet
🐈|cat|mammal|yellow|furry,graceful|-|pet,night
🐎|horse|mammal|orange|fast,strong|-|farm
🐄|cow|mammal|gray|spotted,large|-|farm,milk_animal
🐖|pig|mammal|orange|stout|-|farm
🐑|sheep|mammal|white|woolly|-|farm,wool
🐐|goat|mammal|brown|horned|-|farm,milk_animal
🐪|camel|mammal|orange|humped|-|desert
🦒|giraffe|mammal|orange|spotted,tall|-|long_neck
🐘|elephant|mammal|gray|huge|-|trunk
🦏|rhinoceros|mammal|blue|horned,heavy|-|horn
🐇|rabbit|mammal|white|fluffy|-|hops,pet
🐿️|chipmunk|mammal|orange|small,striped|-|cheeks,stripes
🦔|hedgehog|mammal|-|small,prickly|-|thorns,night
🦇|bat|mammal|brown|winged|-|flies,night
🐁|mouse|mammal|white|small|-|night
🐅|tiger|mammal|orange|large,fierce|-|stripes,big_cat
🐆|leopard|mammal|-|spotted,fast|-|big_cat
🦓|zebra|mammal|-|striped|-|stripes
🦍|gorilla|mammal|gray|strong|-|primate
🐒|monkey|mammal|brown|playful|-|primate
🦘|kangaroo|mammal|-|tall|-|hops,pouch
🦥|sloth|mammal|brown|slow|-|slow
🐻‍❄️|polar bear|mammal|white|furry|-|polar
🐓|rooster|bird|-|crested|-|farm
🦆|duck|bird|-|feathered|-|flies,swims
🦅|eagle|bird|red|fierce|-|flies
🦉|owl|bird|-|wise-looking|-|flies,night
🦜|parrot|bird|-|colourful|-|flies,pet
🦩|flamingo|bird|pink|long-legged|-|flies,long_neck
🐧|penguin|bird|gray|waddling|-|polar,swims
🦢|swan|bird|white|graceful|-|flies,long_neck
🦚|peacock|bird|green|colourful|-|tail_fan
🕊️|dove|bird|white|gentle|-|flies
🐟|fish|sea|blue|scaly|-|swims
🐠|tropical fish|sea|yellow|striped|-|swims
🐡|blowfish|sea|orange|puffy|-|swims,thorns
🦈|shark|sea|gray|large,fierce|-|swims
🐙|octopus|sea|red|soft|-|swims,eight_legs
🦀|crab|sea|orange|clawed|-|swims,shell
🦞|lobster|sea|red|clawed|-|swims,shell
🐬|dolphin|sea|blue|smart,sleek|-|swims
🐳|whale|sea|blue|huge|-|swims
🦑|squid|sea|pink|soft|-|swims
🐢|turtle|sea|-|slow|-|shell,slow,swims
🐝|honeybee|small|-|striped,buzzing|-|flies,sting,pollinate,colony
🦋|butterfly|small|gray|winged|-|flies,pollinate
🐞|ladybug|small|red|spotted|-|flies
🐜|ant|small|gray|tiny,busy|-|colony
🕷️|spider|small|gray|eight-legged|-|eight_legs
🐌|snail|small|brown|slow,slimy|-|shell,slow
🐛|caterpillar|small|yellow|crawling|-|metamorphosis
🐊|crocodile|small|green|scaly|-|swims
🐍|snake|small|yellow|long,scaly|-|slither
🦎|lizard|small|green|scaly|-|desert
🐸|frog|small|yellow|slimy|-|hops,swims
🦂|scorpion|small|orange|clawed|-|sting,desert,eight_legs
🌵|cactus|plant|green|spiny|-|thorns,desert
🌻|sunflower|plant|-|tall,bright|-|flower
🌹|rose|plant|red|fragrant|-|flower,thorns
🌷|tulip|plant|pink|bright|-|flower
🌲|evergreen tree|plant|green|tall,pointed|-|tree
🌴|palm tree|plant|green|tall|-|tree,tropical
🌳|oak tree|plant|green|leafy,tall|-|tree,wood
🍀|four-leaf clover|plant|green|small,lucky|-|luck
🍁|maple leaf|plant|red|autumn|-|canada
🪴|potted plant|plant|green|leafy|decorate|-
🚗|car|vehicle|red|fast|-|wheels
🚕|taxi|vehicle|-|for hire|public|wheels
🚌|bus|vehicle|-|long|public|wheels
🚑|ambulance|vehicle|-|loud|emergency|wheels
🚒|fire engine|vehicle|red|loud|emergency|wheels
🚓|police car|vehicle|-|loud|emergency|wheels
🚚|delivery truck|vehicle|-|boxy|carry_things|wheels
🚜|tractor|vehicle|-|heavy|-|farm,wheels
🏎️|racing car|vehicle|-|fast,low|-|wheels
🏍️|motorcycle|vehicle|-|fast|-|wheels
🚲|bicycle|vehicle|gray|light|pedal|wheels
🛴|kick scooter|vehicle|blue|small|pedal|wheels
🚂|locomotive|vehicle|-|heavy|public|wheels
✈️|airplane|vehicle|blue|winged|fly_vehicle|flies
🚁|helicopter|vehicle|-|loud|fly_vehicle|flies
🚀|rocket|vehicle|-|pointed|fly_vehicle|flies
⛵|sailboat|vehicle|red|light|water_vehicle|-
🚤|speedboat|vehicle|red|fast|water_vehicle|-
🛶|canoe|vehicle|brown|narrow|water_vehicle,pedal|wood
✂️|scissors+|tool|blue|metal|cut|sharp
🔪|kitchen knife|kitchen|white|metal|cut|sharp
🔨|hammer|tool|brown|heavy|drive_nail|wood
🪓|axe|tool|-|heavy|chop_wood|sharp,wood
🔧|wrench|tool|blue|metal|turn_bolt|-
🪛|screwdriver|tool|red|metal|turn_bolt|-
🪚|saw|tool|white|toothed|chop_wood|sharp
⛏️|pickaxe|tool|brown|heavy|dig|sharp
🧲|magnet|tool|red|horseshoe-shaped|iron|-
🪜|ladder|tool|orange|tall|reach_high|wood
🧰|toolbox|tool|red|boxy|carry_things|-
🔦|flashlight|tool|blue|handheld|light|electric
🕯️|candle|household|white|waxy|light|-
🧹|broom|household|yellow|long|sweep|wood
🧽|sponge|household|yellow|soft,porous|wash|-
🪣|bucket|household|blue|round|carry_things|-
🧯|fire extinguisher|tool|red|heavy|fire_out|-
🔑|key|tool|yellow|small,metal|unlock|-
🧪|test tube|tool|blue|thin|-|glass
🔬|microscope|tool|blue|precise|tiny|-
🔭|telescope|tool|-|long|stars|-
💡|light bulb|household|yellow|round|light|electric,glass
🥄|spoon|kitchen|gray|metal|eat_with|-
🍴|fork and knife|kitchen|gray|metal|eat_with,cut|sharp
🫖|teapot|kitchen|red|round|brew_tea|-
🥢|chopsticks+|kitchen|red|thin|eat_with|wood
🧂|salt shaker|kitchen|white|small|season|-
🫙|jar|kitchen|blue|empty|carry_things|glass
🎸|guitar|instrument|red|wooden|music|strings,wood
🎹|piano keyboard|instrument|-|long|music|hit
🎺|trumpet|instrument|yellow|brass,shiny|music|blow
🎷|saxophone|instrument|yellow|brass,curved|music|blow
🥁|drum|instrument|-|round|music|hit
🎻|violin|instrument|red|wooden|music|strings,wood
🪕|banjo|instrument|-|round|music|strings,wood
🪗|accordion|instrument|-|folding|music|-
🎤|microphone|device|gray|handheld|amplify|electric
⚽|soccer ball|sport|gray|round|kick|-
🏀|basketball|sport|red|round,bouncy|hoop|-
🏈|american football|sport|red|oval|kick|-
⚾|baseball|sport|white|round,small|bat_hit|-
🎾|tennis ball|sport|-|round,fuzzy|racket|-
🏐|volleyball|sport|white|round|net|-
🎱|pool ball|sport|gray|round,shiny|cue|-
🏓|ping pong paddle|sport|red|flat|-|wood
🏸|badminton racket|sport|-|light|-|strings
🥊|boxing glove|sport|red|padded|punch|-
⛸️|ice skate|sport|white|bladed|feet|sharp
🛹|skateboard|sport|gray|flat|-|wheels
🛼|roller skate|sport|-|retro|feet|wheels
🥏|flying disc|sport|blue|flat,round|glide|-
🎣|fishing pole|sport|blue|long|fishing|-
🪁|kite|toy|-|light|-|flies
👕|t-shirt|clothing|blue|cotton|wear_body|-
👖|jeans+|clothing|blue|denim|wear_body|-
🧣|scarf|clothing|red|woolly|warm|-
🧤|gloves+|clothing|blue|woolly|warm|-
🧥|coat|clothing|blue|heavy|warm,wear_body|-
🧦|socks+|clothing|white|striped|feet|-
👗|dress|clothing|blue|flowing|wear_body|-
👟|running shoe|clothing|blue|laced|feet|-
👠|high-heeled shoe|clothing|red|elegant|feet|-
👢|boot|clothing|red|tall|feet|-
🎩|top hat|clothing|gray|tall|head|-
🧢|baseball cap|clothing|blue|peaked|head,sun_eyes|-
👑|crown|clothing|yellow|golden,royal|head|precious
⛑️|rescue helmet|clothing|red|hard|head|-
👓|glasses+|clothing|-|thin|-|glass
🕶️|sunglasses+|clothing|black|dark|sun_eyes|glass
🌂|closed umbrella|clothing|blue|folded|rain|-
☂️|umbrella|clothing|blue|open|rain|-
🎒|backpack|clothing|red|roomy|carry_things|-
👜|handbag|clothing|brown|leather|carry_things|-
📱|mobile phone|device|black|flat|call,photo|electric
💻|laptop|device|blue|foldable|type|electric
⌨️|computer keyboard|device|white|flat|type|electric
🖨️|printer|device|gray|boxy|-|electric
📷|camera|device|-|boxy|photo|-
📺|television|device|blue|boxy|-|electric
📻|radio|device|orange|boxy|music|electric
☎️|telephone|device|red|old-fashioned|call|electric
⏰|alarm clock|device|-|round|tell_time,ring|-
⌚|wristwatch|device|white|small|tell_time|-
⏳|hourglass|household|-|glass|tell_time|glass
🔋|battery|device|green|cylindrical|-|electric
🎮|game controller|device|gray|handheld|play_games|electric
🕹️|joystick|device|gray|handheld|play_games|electric
✏️|pencil|stationery|-|thin,long|write|wood
🖊️|pen|stationery|blue|thin|write|-
🖌️|paintbrush|stationery|blue|thin|paint|-
🖍️|crayon|stationery|red|waxy|write|-
📏|ruler|stationery|yellow|straight|measure|-
📐|set square|stationery|yellow|triangular|measure|-
📎|paperclip|stationery|blue|small,bent|hold_paper|-
📌|pushpin|stationery|red|small|hold_paper|sharp
📕|red book|stationery|red|closed|read|-
📚|stack of books|stationery|-|heavy|read|-
✉️|envelope|stationery|white|paper|mail|-
📦|parcel|stationery|brown|boxy|mail,carry_things|-
🧮|abacus|stationery|-|beaded|count|wood
🎨|paint palette|stationery|orange|colourful|paint|wood
🛏️|bed|household|-|soft|sleep|-
🛋️|couch|household|blue|soft|sit|-
🪑|chair|household|orange|wooden|sit|wood
🚽|toilet|household|white|porcelain|-|bathroom
🛁|bathtub|household|white|deep|wash|bathroom
🧺|basket|household|orange|woven|carry_things|-
🧻|toilet paper|household|white|soft|-|bathroom
🧼|soap|household|-|slippery|wash|bathroom
🪥|toothbrush|household|-|thin|teeth|bathroom
🪒|razor|household|blue|sharp|shave,cut|sharp,bathroom
🧴|lotion bottle|household|blue|squeezable|skin|bathroom
🔔|bell|household|yellow|brass|ring|-
🪙|coin|household|yellow|round,small|pay|-
💎|gem|household|blue|sparkling|-|precious
🏆|trophy|household|-|golden,shiny|award|-
🏅|medal|household|-|round|award|-
⚓|anchor|household|blue|heavy,metal|hold_boat|-
🧭|compass|household|-|round|find_way|-
🎃|jack-o'-lantern|household|orange|carved|light|halloween
🎄|christmas tree|plant|green|decorated|-|christmas
⛄|snowman|household|white|round|-|cold,christmas
🎁|gift box|household|-|wrapped|party|christmas
🎈|balloon|toy|red|round,floating|party|-
🧸|teddy bear|toy|brown|soft,cuddly|cuddle|-
🪀|yo-yo|toy|red|round|string_toy|-
🧩|puzzle piece|toy|green|interlocking|fit_together|-
🎲|die|toy|white|cubic|board_game|-
♟️|chess pawn|toy|gray|small|board_game|-
🪆|nesting dolls+|toy|-|painted|-|wood
"""


CATEGORY_USES: dict[str, str] = {
    "fruit": "eat",
    "vegetable": "eat",
    "food": "eat",
    "sweet": "eat",
    "drink": "drink",
}


def _parse(table: str) -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for n, line in enumerate(table.strip().splitlines(), 1):
        cols = [c.strip() for c in line.split("|")]
        if len(cols) != 7:
            raise ValueError(f"knowledge table line {n}: expected 7 columns, got {len(cols)}: {line!r}")
        emoji, name, cat, colour, attrs, uses, facts = cols
        plural = name.endswith("+")
        name = name.rstrip("+")

        def split(s: str) -> tuple[str, ...]:
            return () if s == "-" else tuple(x.strip() for x in s.split(",") if x.strip())

        uses_t = split(uses)
        # Category-level uses: everything edible can be eaten, every drink can be drunk.
        default_use = CATEGORY_USES.get(cat)
        if default_use is not None and default_use not in uses_t:
            uses_t = (default_use, *uses_t)
        kind = Kind(
            emoji=emoji,
            name=name,
            plural=plural,
            category=cat,
            colour=None if colour == "-" else colour,
            attributes=split(attrs),
            uses=uses_t,
            facts=split(facts),
        )
        if cat not in CATEGORIES:
            raise ValueError(f"knowledge table line {n} ({name}): unknown category {cat!r}")
        if kind.colour is not None and kind.colour not in COLOURS:
            raise ValueError(f"knowledge table line {n} ({name}): unknown colour {colour!r}")
        for pid in kind.uses + kind.facts:
            if pid not in PROPERTIES:
                raise ValueError(f"knowledge table line {n} ({name}): unknown property {pid!r}")
        for pid in kind.uses:
            if PROPERTIES[pid].kind != "use":
                raise ValueError(f"knowledge table line {n} ({name}): {pid!r} is a fact, listed as a use")
        for pid in kind.facts:
            if PROPERTIES[pid].kind != "fact":
                raise ValueError(f"knowledge table line {n} ({name}): {pid!r} is a use, listed as a fact")
        if not kind.properties:
            raise ValueError(f"knowledge table line {n} ({name}): a kind needs at least one use or fact")
        if name in kinds:
            raise ValueError(f"knowledge table line {n}: duplicate kind {name!r}")
        kinds[name] = kind
    return kinds


KINDS: dict[str, Kind] = _parse(_TABLE)


@cache
def kinds_with(prop: str) -> frozenset[str]:
    """Names of the kinds that have property ``prop``."""
    return frozenset(k.name for k in KINDS.values() if prop in k.properties)


@cache
def kinds_in(category: str) -> frozenset[str]:
    """Names of the kinds in ``category``."""
    return frozenset(k.name for k in KINDS.values() if k.category == category)
