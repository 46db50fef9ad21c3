"""English word lists of the synthetic speech corpus, grouped into topics.

Every word is plain lowercase a-z, appears once, and no two words of a word set share an eSpeak NG
pronunciation (checked by ``tests/speech/test_words.py``), so a word error is a real error and
not a homophone the acoustics cannot separate. Topics give clients a non-IID vocabulary mix.

Word sets (:data:`WORD_SETS`) name the vocabularies a corpus can draw from: ``all`` (the 500-odd
words of :data:`TOPICS`) and ``digits`` (the ten spoken digits, as in TIDIGITS: Leonard, ICASSP
1984), a vocabulary small enough for a Conformer-Transducer to learn in minutes on a CPU.
"""

TOPICS: dict[str, tuple[str, ...]] = {
    "nature": tuple(
        """
        river mountain forest valley ocean island desert meadow garden flower branch leaf root stone
        rock sand hill lake stream pond cloud thunder lightning storm rainbow sunset sunrise shadow
        grass field canyon glacier volcano waterfall cliff cave jungle swamp prairie harbor beach coast
        wave tide breeze frost snowflake pebble seed blossom orchard vine moss fern pine oak maple
        willow
        """.split()
    ),
    "food": tuple(
        """
        apple banana orange lemon cherry grape melon peach potato tomato carrot onion garlic pepper
        cabbage lettuce bread butter cheese honey sugar salt rice noodle soup salad sandwich pizza
        cookie cake pie chocolate coffee juice milk tea water breakfast lunch dinner supper kitchen
        spoon fork knife plate bowl cup bottle kettle oven recipe dessert yogurt cereal pancake
        """.split()
    ),
    "home": tuple(
        """
        house window door table chair sofa carpet blanket pillow mirror lamp candle clock picture shelf
        drawer closet basket bucket ladder hammer nail brush towel soap curtain ceiling floor roof
        chimney garage basement attic staircase fence gate mailbox bedroom bathroom hallway cushion
        jacket sweater shirt trousers boots sock glove scarf umbrella pocket button zipper wallet
        """.split()
    ),
    "city": tuple(
        """
        street bridge tower station airport market museum library hospital school church castle palace
        village city country highway tunnel subway train bus taxi bicycle truck airplane rocket ship
        boat engine wheel ticket passport journey travel map compass corner building office factory
        bakery pharmacy theater stadium restaurant hotel parking traffic signal sidewalk avenue
        """.split()
    ),
    "body": tuple(
        """
        head shoulder elbow finger thumb knee ankle heel toe forehead eyebrow cheek chin lip tongue
        tooth neck stomach muscle bone heart lung brain skin blood doctor nurse medicine fever cough
        sneeze headache bandage healthy sleepy hungry thirsty tired strong gentle careful exercise yawn
        smile laugh whisper shout
        """.split()
    ),
    "work": tuple(
        """
        teacher student lesson homework pencil paper notebook chapter question answer number letter word
        sentence story poem puzzle problem science history music painting drawing computer keyboard
        screen printer camera telephone message meeting project manager worker farmer baker painter
        pilot soldier driver singer dancer author artist engineer scientist lawyer
        """.split()
    ),
    "animals": tuple(
        """
        dog cat horse cow sheep goat pig rabbit mouse squirrel fox wolf bear tiger lion elephant giraffe
        zebra monkey kangaroo camel donkey chicken duck goose turkey eagle owl parrot pigeon penguin
        dolphin whale shark turtle frog snake lizard spider butterfly bee ant beetle mosquito ladybug
        lobster octopus salmon kitten puppy pony
        """.split()
    ),
    "time": tuple(
        """
        morning afternoon evening midnight today tomorrow yesterday monday tuesday wednesday thursday
        friday saturday sunday january february march april june july august september october november
        december spring summer autumn winter season holiday birthday weekend calendar minute second
        moment century decade yearly weather sunny cloudy windy rainy snowy foggy
        """.split()
    ),
    "verbs": tuple(
        """
        run walk jump climb swim fly drive ride carry bring take give open close push pull throw catch
        kick build break fix cook bake clean wash paint draw sing dance play read listen watch speak
        call ask tell think remember forget learn teach begin finish follow visit invite borrow explain
        wonder imagine whistle dig
        """.split()
    ),
    "adjectives": tuple(
        """
        big small tall short long wide narrow heavy light bright dark quiet loud happy angry brave lucky
        funny silly busy lazy clever famous empty full dirty warm cold hot cool soft hard smooth rough
        sweet sour bitter fresh early late quick slow young old green yellow purple silver golden brown
        black white pink proud shiny tiny giant
        """.split()
    ),
    "numbers": tuple(
        """
        one three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred
        thousand million first third half double dozen zero
        """.split()
    ),
}

WORDS: tuple[str, ...] = tuple(word for words in TOPICS.values() for word in words)

DIGITS: tuple[str, ...] = tuple("zero one two three four five six seven eight nine".split())
"""The ten spoken digits."""

WORD_SETS: dict[str, dict[str, tuple[str, ...]]] = {"all": TOPICS, "digits": {"digits": DIGITS}}
"""Vocabularies a corpus draws from (``CorpusConfig.words``): topic name -> words."""
