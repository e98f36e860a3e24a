"Schemathesis hooks for the API test: the photos it uploads as valid data are real lake photos"
# The schema says what a valid upload is (a whole photo in an accepted format, at least `min_side` px a side), but
# JSON Schema cannot make a fuzzer draw one: left alone, schemathesis sends random bytes or 1x1 images, which the
# server rightly refuses (422), and `positive_data_acceptance` would count each refusal as a failure.
from pathlib import Path
import schemathesis
from hypothesis import strategies as st

LAKE = Path(__file__).parent/'lake'
PHOTOS = st.sampled_from([(LAKE/f'{c}/{i}.jpg').read_bytes() for c in ['Cat', 'Dog'] for i in range(1, 13)])

schemathesis.openapi.format('binary', PHOTOS)  # each multipart file
for t in ['image/jpeg', 'image/png', 'image/webp', 'image/bmp', 'application/octet-stream']:  # a raw image body
    schemathesis.openapi.media_type(t, PHOTOS)
