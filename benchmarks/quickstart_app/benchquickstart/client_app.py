"""The quickstart-style ClientApp: clear the Keras session, rebuild the model, fit, reply."""

import keras
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from benchquickstart.task import load_data, load_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the model on local data."""
    keras.backend.clear_session()
    x_train, y_train = load_data(context)
    model = load_model(x_train.shape[1], context.run_config["learning-rate"])
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    history = model.fit(
        x_train,
        y_train,
        epochs=context.run_config["local-epochs"],
        batch_size=context.run_config["batch-size"],
        verbose=0,
    )
    metrics = MetricRecord({"train_loss": history.history["loss"][-1], "num-examples": len(x_train)})
    return Message(RecordDict({"arrays": ArrayRecord(model.get_weights()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model on local data."""
    keras.backend.clear_session()
    x_test, y_test = load_data(context)
    model = load_model(x_test.shape[1], context.run_config["learning-rate"])
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    loss = model.evaluate(x_test, y_test, verbose=0)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(x_test)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
