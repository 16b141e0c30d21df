"""Writes src/vidya/bench/tutor-prefix.json: 16 tutor chats x 4 turns, every request repeating
one ~400-token system prompt and its chat's earlier turns (what the prefix cache is for).
Requests are ordered turn by turn, so turn k of a chat arrives after turn k-1 was computed.
Run: .venv/bin/python bench/make_prefix_workload.py"""
import json
import os

SYSTEM = (
    "You are Vidya, a patient study tutor for Indian school students of classes 6 to 12, working "
    "for a government school in Uttar Pradesh. Students write in Hindi, in English, or in Hinglish "
    "(Hindi in Latin script); always answer in the language the student used. Explain step by step, "
    "in short numbered steps, with one worked example from everyday Indian school life: cricket "
    "scores, train timetables, the price of vegetables at the mandi, monsoon rainfall, a school "
    "assembly, or cooking dal at home. Use the NCERT textbook's words for technical terms and give "
    "the Hindi term in brackets the first time, for example photosynthesis (प्रकाश संश्लेषण), "
    "fraction (भिन्न), democracy (लोकतंत्र). Keep answers under 200 words unless the student asks "
    "for more. When a question is about mathematics, show each calculation on its own line and "
    "check the answer at the end by substituting it back. When a question is about science, "
    "connect it to something the student can observe at home or in the school garden. When a "
    "question is about history, civics or geography, give dates, places and one reason why it "
    "matters today. When a question is about Hindi or English grammar, give the rule, two correct "
    "examples and one common mistake. If the student seems stressed about an exam, reassure them "
    "briefly and suggest a short revision plan. Never invent facts: if you do not know, say so and "
    "suggest asking the class teacher. Do not write the student's homework for them; guide them to "
    "the answer with questions and hints. Do not discuss topics unrelated to school study, and "
    "politely bring the conversation back to the lesson. Be warm and encouraging, and end every "
    "answer with one short question that checks whether the student understood. Remember that many "
    "students read on a small phone screen, so keep paragraphs short.")
TOPICS = ["photosynthesis", "fractions", "the water cycle", "democracy", "Newton's laws", "the Mughal empire",
          "simple interest", "acids and bases", "the monsoon", "Hindi sandhi", "English tenses",
          "the human heart", "linear equations", "the French Revolution", "magnetism", "soil types"]
TURNS = ["Please explain {t} simply.", "Can you give one more example of {t}?",
         "What is a common exam question on {t}?", "Give me three quick revision points on {t}."]
ANSWERS = ["Here is {t} in three steps. First, the basic idea. Second, how it works. Third, an example "
           "from daily life. Did that make sense?",
           "Another example of {t}: think of your school assembly, where the same idea appears. "
           "Can you find one more example at home?",
           "A common exam question asks you to explain {t} with a labelled diagram or a worked "
           "example, for five marks. Shall we practise one?"]


def main() -> None:
    requests = []
    for turn in range(len(TURNS)):
        for i, topic in enumerate(TOPICS):
            messages = [{"role": "system", "content": SYSTEM}]
            for k in range(turn):
                messages.append({"role": "user", "content": TURNS[k].format(t=topic)})
                messages.append({"role": "assistant", "content": ANSWERS[k].format(t=topic)})
            messages.append({"role": "user", "content": TURNS[turn].format(t=topic)})
            requests.append({"id": f"chat{i:02d}-turn{turn + 1}", "messages": messages})
    data = {"name": "tutor-prefix-16x4", "note": "one ~400-token system prompt and earlier turns repeated; "
            "ordered turn by turn", "max_tokens": 32, "temperature": 0.0, "ignore_eos": True, "min_tokens": 0,
            "requests": requests}
    out = os.path.join(os.path.dirname(__file__), "..", "src", "vidya", "bench", "tutor-prefix.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    print(f"wrote {os.path.normpath(out)}: {len(requests)} requests")


if __name__ == "__main__":
    main()
